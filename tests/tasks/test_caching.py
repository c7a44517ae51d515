"""Stage cache keys that cannot lie: a library upgrade recomputes every stage, and a timing or an engine is
keyed by the machine that made it (the cache may sit on a volume shared by several nodes)."""

from __future__ import annotations

import uuid

from prefect import flow

from optforge.tasks.runtime import caching
from optforge.tasks.runtime.caching import library_versions, machine_identity, stage_key, stage_task


def _upgraded(name: str) -> dict[str, str]:
    return {**library_versions(), name: library_versions()[name] + ".post1"}


def test_the_key_names_the_libraries_and_for_measuring_stages_the_machine(monkeypatch):
    params = {"cfg": {"threads": 2}, "model": "sha"}
    before = {s: stage_key(s, params) for s in ("train", "benchmark", "tensorrt")}
    assert set(library_versions()) >= {"torch", "onnx", "onnxruntime", "transformers"}
    assert library_versions()["torch"] != "absent" and machine_identity()["cpu_model"]

    monkeypatch.setattr(caching, "library_versions", lambda: _upgraded("onnxruntime"))
    assert all(stage_key(s, params) != before[s] for s in before)  # an upgrade invalidates every stage
    monkeypatch.undo()

    monkeypatch.setattr(caching, "machine_identity", lambda: {**machine_identity(), "cpu_model": "Another CPU"})
    assert stage_key("train", params) == before["train"]  # training gives the same weights anywhere
    assert stage_key("benchmark", params) != before["benchmark"]  # timings belong to the CPU that took them
    assert stage_key("tensorrt", params) != before["tensorrt"]


def test_a_changed_library_version_forces_a_recompute(monkeypatch, tmp_path):
    calls = tmp_path / "calls.txt"
    token = uuid.uuid4().hex  # a key no earlier test run has cached

    @stage_task("benchmark", retries=0)
    def measure(token: str) -> int:
        with calls.open("a") as fh:
            fh.write("x")
        return len(calls.read_text())

    @flow
    def run_once() -> int:
        return measure(token)

    assert run_once() == 1
    assert run_once() == 1  # cached: the stage did not run again
    monkeypatch.setattr(caching, "library_versions", lambda: _upgraded("onnxruntime"))
    assert run_once() == 2  # onnxruntime "upgraded": measured again
    monkeypatch.setattr(caching, "machine_identity", lambda: {**machine_identity(), "gpu": "Another GPU"})
    assert run_once() == 3  # another machine: measured again
    assert calls.read_text() == "xxx"
