"""optforge: turn a trained PyTorch model into a faster, smaller one, as a tracked Prefect flow.

The pipeline's code lives in the repository's ``flows/`` and ``tasks/`` folders and installs as
``optforge.flows`` and ``optforge.tasks`` (see pyproject.toml), so nothing a user keeps next to their
config or notebook (a Celery ``tasks.py``, a ``flows/`` folder) can shadow it.
"""

from optforge.flows.api import optimize, tune

__all__ = ["optimize", "tune"]
