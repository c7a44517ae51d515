"""Prefect task shells, one per stage: read inputs by path, call a technique (tasks.techniques), log a child MLflow run, return a small reference (path + content hash + run id)."""
