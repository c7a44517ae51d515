"""ONNX: export and parity, Runtime sessions, transformer fusion, dynamic and static INT8, FP16."""
