"""The functional core: pure PyTorch / ONNX / ONNX Runtime code.

Nothing in this package imports prefect or mlflow (a test checks it), so every technique runs and
is tested on a toy model in milliseconds, and the Prefect task shells in ``tasks/`` stay thin.
"""
