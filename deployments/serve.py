"""Serve the optimize flow on a schedule from this machine: ``python deployments/serve.py [options]``.

The same as ``optforge serve`` (see ``flows/serve_cmd.py`` and ``--help``); kept here beside
``prefect.yaml`` so both ways of scheduling the flow live in one folder.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout that is not pip-installed
    from optforge.flows.serve_cmd import main

    sys.exit(main())
