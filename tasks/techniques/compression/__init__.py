"""Compression: distillation and students, pruning, factorization, clustering, binarization, circulant layers, early exits, quantization-aware training, bit-packing."""
