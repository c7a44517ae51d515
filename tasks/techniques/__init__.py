"""The functional core: pure PyTorch / ONNX / ONNX Runtime code, grouped by concern.

``data`` (the split folder and its sources), ``models`` (architectures, rebuilding from a spec), ``training``
(the epoch loop, fine-tuning, rank agreement), ``compression`` (the PyTorch techniques), ``onnx`` (export and
the ONNX transforms), ``engines`` (TensorRT, TVM, PyTorch on a GPU), ``measurement`` (metrics, benchmarks,
selection); ``registry`` holds one record per technique. Nothing in this package imports prefect or mlflow
(a test checks it), so every technique runs and is tested on a toy model in milliseconds, and the Prefect
task shells in ``tasks/`` stay thin.
"""
