"""Architecture rules that a refactor could silently break."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import tasks.techniques

ROOT = Path(__file__).resolve().parents[1]


def test_techniques_never_import_prefect_or_mlflow():
    modules = [f"tasks.techniques.{m.name}" for m in pkgutil.iter_modules(tasks.techniques.__path__)]
    assert len(modules) >= 6
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"functional core imported: {out.stdout}"


def test_importing_flows_has_no_side_effects(tmp_path):
    """Importing the flow and CLI modules must not create files, start Ray or set MLflow's URI."""
    code = (
        "import flows.optimize, flows.cli, ray, mlflow, os\n"
        "assert not ray.is_initialized()\n"
        "print(sorted(os.listdir('.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"
