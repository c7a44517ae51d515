"""Engines: runtimes that build their own form of a model (TensorRT, TVM, PyTorch on a GPU)."""
