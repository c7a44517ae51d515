"""Architecture rules that a refactor could silently break."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import optforge.tasks.techniques as techniques

ROOT = Path(__file__).resolve().parents[1]


def test_techniques_never_import_prefect_or_mlflow():
    modules = [m.name for m in pkgutil.walk_packages(techniques.__path__, "optforge.tasks.techniques.")]
    assert len(modules) >= 50
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
        "import optforge.flows.optimize, optforge.flows.cli, ray, mlflow, os\n"
        "assert not ray.is_initialized()\n"
        "print(sorted(os.listdir('.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"


def test_a_users_tasks_py_and_flows_folder_cannot_shadow_the_pipeline(tmp_path):
    """A Celery-style ``tasks.py`` and a ``flows/`` package in the user's folder (first on ``sys.path`` for
    ``python -c``, a notebook or a script there) are not what the pipeline imports: it is ``optforge.*``."""
    (tmp_path / "tasks.py").write_text("raise RuntimeError(\"the user's tasks.py was imported\")\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("raise RuntimeError(\"the user's flows/ was imported\")\n")
    code = ("import sys, optforge.flows.optimize, optforge.flows.cli, optforge.tasks.stages.train\n"
            "import importlib.util, os  # a plain 'import tasks' here would get the user's file:\n"
            "assert importlib.util.find_spec('tasks').origin == os.path.join(os.getcwd(), 'tasks.py')\n"
            "print(optforge.tasks.stages.train.__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).resolve() == ROOT / "tasks" / "stages" / "train.py"


def _import_graph() -> dict[str, set[str]]:
    """Every optforge module -> the optforge modules it imports anywhere, inside functions included."""
    files = {}
    for folder in ("flows", "tasks", "deployments"):
        for f in (ROOT / folder).rglob("*.py"):
            files["optforge." + ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = f
    graph = {name: set() for name in files}
    for name, f in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optforge"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def test_no_import_cycle_even_inside_a_function():
    """An import inside a function hides a cycle from Python, not from this walk (STYLE.md: such imports are
    for optional heavy dependencies only)."""
    graph = _import_graph()
    assert len(graph) > 50 and "optforge.tasks.techniques.models.rebuild" in graph["optforge.tasks.stages.train"]

    def reaches(start: str, goal: str) -> list[str] | None:
        seen, todo = set(), [[start]]
        while todo:
            path = todo.pop()
            for nxt in graph[path[-1]]:
                if nxt == goal:
                    return [*path, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append([*path, nxt])
        return None

    cycles = [cycle for name in sorted(graph) if (cycle := reaches(name, name))]
    assert not cycles, f"import cycles: {cycles[:3]}"
