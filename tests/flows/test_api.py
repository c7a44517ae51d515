"""The Python API (optforge.optimize): README.md's notebook example, run as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)\n```", text, re.DOTALL)
    assert match, "README.md lost its <!-- api-example --> block"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_example_runs_from_a_folder_with_its_own_tasks_py(tmp_path):
    # A Celery-style tasks.py and a flows/ package beside the notebook: first on sys.path for a script.
    (tmp_path / "tasks.py").write_text("raise RuntimeError(\"the user's tasks.py was imported\")\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("raise RuntimeError(\"the user's flows/ was imported\")\n")
    (tmp_path / "notebook.py").write_text(readme_example())
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = subprocess.run([sys.executable, "notebook.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    printed = out.stdout.splitlines()
    assert any(re.match(r"prune_int8 +\d+\.\d\d%", line) for line in printed), out.stdout[-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (version,) = client.search_model_versions("name = 'digits-notebook'")
    assert printed[0].startswith(version.tags["variant"])
    # The notebook's class went to the Ray workers whole; the flow trained it (train.epochs was set).
    train_run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   "tags.`optforge.stage` = 'train'")[0]
    assert train_run.data.params["model.arch"] == "optforge.flows.api:load_pickled_module"
    assert train_run.data.metrics["val_accuracy"] > 80


def test_what_the_api_cannot_take_is_named(tmp_path, monkeypatch):
    import optforge

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        optforge.optimize(model=42)
    with pytest.raises(TypeError, match=r"data: expected \(X, y\) arrays or a path"):
        optforge.optimize(data=[1, 2, 3])
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was tracked


NOTEBOOK_MODEL = '''
import sys
from pathlib import Path

import torch
from torch import nn

from optforge.flows.api import _model_section


class Net(nn.Module):  # defined in __main__, as in a notebook
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))

    def forward(self, x):
        return self.body(x){extra}


torch.manual_seed(0)
print(_model_section(Net(), Path(sys.argv[1]))["kwargs"]["file"])
'''


def test_a_notebook_model_keeps_its_folder_in_the_next_session(tmp_path):
    """A restarted notebook hands over the same model: same folder, so the same cache keys (and tune resumes).
    cloudpickle alone gives a ``__main__`` class a new random id per process."""

    def folder(source: str) -> str:
        script = tmp_path / "notebook.py"
        script.write_text(source)
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "inputs")], capture_output=True, text=True,
                             timeout=120, check=True)
        return out.stdout.strip().splitlines()[-1]

    first, second = folder(NOTEBOOK_MODEL.format(extra="")), folder(NOTEBOOK_MODEL.format(extra=""))
    assert first == second and Path(first).is_file()
    changed = folder(NOTEBOOK_MODEL.format(extra=" * 2"))  # the class's code changed: a new folder
    assert changed != first
