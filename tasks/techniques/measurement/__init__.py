"""Measurement: accuracy metrics, FLOPs, benchmarking and the bench harness, the Pareto front, selection and reports."""
