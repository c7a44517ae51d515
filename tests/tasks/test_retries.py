"""Retries with judgment, through Prefect's real engine."""

import uuid

import pytest
from prefect import flow

from optforge.tasks.runtime.caching import stage_task
from optforge.tasks.runtime.retrying import is_transient

CALLS: dict[str, int] = {}


@stage_task("flaky")
def flaky(key: str, error: str, parent_run_id: str | None = None) -> int:
    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] == 1:
        raise {"connection": ConnectionError("tracking server unreachable"), "value": ValueError("train.lr: bad"),
               "io": OSError(5, "Input/output error")}[error]
    return CALLS[key]


@flow
def run_flaky(key: str, error: str) -> int:
    return flaky.with_options(retry_delay_seconds=0)(key=key, error=error)


@pytest.mark.parametrize("error", ["connection", "io"])
def test_transient_failures_are_retried(error):
    key = uuid.uuid4().hex
    assert run_flaky(key, error) == 2
    assert CALLS[key] == 2


def test_deterministic_failures_are_not_retried():
    key = uuid.uuid4().hex
    with pytest.raises(ValueError, match="train.lr"):
        run_flaky(key, "value")
    assert CALLS[key] == 1


def test_classification():
    class MlflowException(Exception):
        pass

    assert is_transient(TimeoutError())
    assert is_transient(MlflowException("API request failed: Max retries exceeded with url: /api/2.0/..."))
    assert not is_transient(MlflowException("RESOURCE_DOES_NOT_EXIST: run 123"))
    assert not is_transient(FileNotFoundError("data.npz"))
    assert not is_transient(FloatingPointError("nan"))
    try:
        try:
            raise ConnectionRefusedError("refused")
        except ConnectionRefusedError as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)
