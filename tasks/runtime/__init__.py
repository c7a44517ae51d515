"""What every stage runs on: the content-addressed cache, MLflow tracking, retries of transient failures, the references stages pass, live progress, the idle-timing lock."""
