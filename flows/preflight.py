"""Fail-fast reachability checks for the servers a run is pointed at by environment variables.

Without them a wrong address costs minutes, not seconds: MLflow's HTTP client retries with
back-off (7 tries, about two minutes), Prefect's client retries as well, and ``ray.init`` on an
address with no cluster behind it waits for the GCS. Each check here makes one short request and
reports the variable and its value, so ``optforge run`` stops within seconds with a message such as::

    cannot reach the servers this run is configured to use:
      MLFLOW_TRACKING_URI=http://mlflow.internal:5000: no MLflow server answers: GET .../health: connection refused

Nothing runs at import; the Ray check does not import ray unless ``RAY_ADDRESS=auto``.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

# 5 s per request: a healthy server on a LAN answers /health in milliseconds; the checks run in
# parallel, so a run with all three servers down still fails in about 5 s (well under 30 s).
DEFAULT_TIMEOUT_S = 5.0

# HTTP/2 client connection preface plus an empty SETTINGS frame (RFC 9113 section 3.4). A gRPC
# server such as Ray's GCS answers with its own SETTINGS frame (type 0x4) before anything else.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x4


class PreflightError(RuntimeError):
    """A server named by an environment variable cannot be reached; the message names both."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("cannot reach the servers this run is configured to use:\n  " + "\n  ".join(problems))


def _reason(exc: BaseException) -> str:
    """A short human reason for a failed request: 'connection refused', 'timed out after 5 s', ..."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    inner = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(inner, ConnectionRefusedError):
        return "connection refused"
    if isinstance(inner, (TimeoutError, socket.timeout)):
        return "no answer (timed out)"
    if isinstance(inner, socket.gaierror):
        return f"cannot resolve host ({inner.strerror or inner})"
    return f"{type(inner).__name__}: {inner}"


def _http_get(url: str, timeout: float, headers: Mapping[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    with urllib.request.urlopen(request, timeout=timeout) as response:  # http(s) only: the callers check the scheme
        return response.read(256)


def check_mlflow(uri: str | None, timeout: float = DEFAULT_TIMEOUT_S) -> str | None:
    """``GET <uri>/health`` when ``uri`` is an HTTP(S) tracking server; other stores are not checked.

    Returns:
        None when reachable (or not a server), else the problem, naming ``MLFLOW_TRACKING_URI``.
    """
    if not uri or urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return None  # sqlite:///, file:, postgresql:// ... are opened directly by the client
    url = uri.rstrip("/") + "/health"
    try:
        _http_get(url, timeout)
    except Exception as exc:
        return f"MLFLOW_TRACKING_URI={uri}: no MLflow server answers: GET {url}: {_reason(exc)}"
    return None


def check_prefect(url: str | None, timeout: float = DEFAULT_TIMEOUT_S, api_key: str | None = None,
                  source: str = "PREFECT_API_URL") -> str | None:
    """``GET <PREFECT_API_URL>/health`` (the Prefect server answers ``true``); unset means ephemeral.

    Args:
        url: the API URL, e.g. ``http://prefect.internal:4200/api``.
        timeout: seconds for the request.
        api_key: sent as a bearer token (Prefect Cloud).
        source: how the problem names the setting (the variable, or the Prefect profile it came from).
    """
    if not url:
        return None
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return f"{source}={url}: not an http(s) URL (expected e.g. http://prefect.internal:4200/api)"
    health = url.rstrip("/") + "/health"
    try:
        body = _http_get(health, timeout, {"Authorization": f"Bearer {api_key}"} if api_key else None)
    except Exception as exc:
        not_found = isinstance(exc, urllib.error.HTTPError) and exc.code == 404
        hint = " (a Prefect server's API URL ends in /api)" if not_found else ""
        return f"{source}={url}: no Prefect API answers: GET {health}: {_reason(exc)}{hint}"
    try:
        healthy = json.loads(body or b"null")
    except ValueError:
        healthy = None
    if healthy is not True:
        return f"{source}={url}: GET {health} answered {body[:80]!r}, not a healthy Prefect API"
    return None


def _split_host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        return None
    return host, int(port)


def _probe_grpc(host: str, port: int, timeout: float) -> str | None:
    """Connect and exchange HTTP/2 prefaces: None if a gRPC server (Ray's GCS speaks gRPC) answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_H2_PREFACE)
            header = sock.recv(9)
    except Exception as exc:
        return _reason(exc)
    if len(header) < 4 or header[3] != _H2_SETTINGS:
        return f"something listens at {host}:{port} but it does not speak gRPC (answered {header[:16]!r})"
    return None


def _resolve_auto() -> str | None:
    """The GCS address ``RAY_ADDRESS=auto`` finds on this machine (what ``ray start`` wrote), or None."""
    from ray._private.services import canonicalize_bootstrap_address  # private, but what ray.init uses

    try:
        return canonicalize_bootstrap_address("auto")
    except ConnectionError:
        return None


def check_ray(address: str | None, timeout: float = DEFAULT_TIMEOUT_S) -> str | None:
    """Check that a Ray cluster answers at ``RAY_ADDRESS`` before ``ray.init`` waits on it.

    Accepts what ``ray.init`` accepts: unset or ``local`` (start Ray in the process: nothing to
    check), ``auto`` (a cluster started on this machine with ``ray start``), ``host:port`` of the
    head's GCS (default port 6379) or ``ray://host:port`` (Ray Client, default port 10001). Both
    server kinds speak gRPC, so the check is a TCP connect plus an HTTP/2 preface exchange.
    """
    if not address or address == "local":
        return None
    name = f"RAY_ADDRESS={address}"
    target = address
    if address == "auto":
        try:
            target = _resolve_auto()
        except Exception as exc:
            return None if isinstance(exc, ImportError) else f"{name}: cannot look up a local cluster: {exc}"
        if target is None:
            return (f"{name}: no Ray cluster is running on this machine "
                    "(start one with `ray start --head`, or unset RAY_ADDRESS)")
    scheme = urllib.parse.urlsplit(target).scheme if "://" in target else ""
    if scheme in ("http", "https"):
        return (f"{name}: this is a dashboard / Jobs API URL; ray.init needs the head's GCS address "
                "(host:6379) or a Ray Client address (ray://host:10001)")
    if scheme not in ("", "ray"):
        return f"{name}: unsupported scheme {scheme!r}; expected host:port, ray://host:port, auto or local"
    parsed = _split_host_port(target.split("://", 1)[-1])
    if parsed is None:
        return f"{name}: expected host:port (e.g. ray-head:6379), ray://host:port, auto or local"
    host, port = parsed
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        # TLS-wrapped gRPC: a raw preface would be rejected; a TCP connect is the check we can make.
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except Exception as exc:
            return f"{name}: no Ray cluster answers at {host}:{port}: {_reason(exc)}"
        return None
    problem = _probe_grpc(host, port, timeout)
    if problem:
        what = "Ray Client server" if scheme == "ray" else "Ray head (GCS)"
        return f"{name}: no {what} answers at {host}:{port}: {problem}"
    return None


def _prefect_setting(env: Mapping[str, str]) -> tuple[str | None, str | None, str]:
    """PREFECT_API_URL and key from ``env``; else from the active Prefect profile (`prefect config set`)."""
    if env.get("PREFECT_API_URL"):
        return env["PREFECT_API_URL"], env.get("PREFECT_API_KEY"), "PREFECT_API_URL"
    if env is not os.environ:
        return None, None, "PREFECT_API_URL"
    try:
        from prefect.settings import get_current_settings  # imported only when needed

        settings = get_current_settings()
        key = settings.api.key.get_secret_value() if settings.api.key else None
        return settings.api.url, key, "PREFECT_API_URL (from the active Prefect profile)"
    except Exception:
        return None, None, "PREFECT_API_URL"


def check_environment(env: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT_S, *,
                      mlflow: bool = True, prefect: bool = True, ray: bool = True) -> None:
    """Check MLFLOW_TRACKING_URI, PREFECT_API_URL and RAY_ADDRESS in parallel; raise on any problem.

    Args:
        env: the variables to check (default: this process's environment, plus the Prefect profile).
        timeout: seconds per request; the whole check takes about this long at most.
        mlflow: check MLFLOW_TRACKING_URI.
        prefect: check PREFECT_API_URL.
        ray: check RAY_ADDRESS.

    Raises:
        PreflightError: one line per unreachable server, each naming the variable and its value.
    """
    env = os.environ if env is None else env
    checks = []
    if mlflow:
        checks.append(lambda: check_mlflow(env.get("MLFLOW_TRACKING_URI"), timeout))
    if prefect:
        url, key, source = _prefect_setting(env)
        checks.append(lambda: check_prefect(url, timeout, key, source))
    if ray:
        checks.append(lambda: check_ray(env.get("RAY_ADDRESS"), timeout))
    with ThreadPoolExecutor(max_workers=max(len(checks), 1), thread_name_prefix="preflight") as pool:
        problems = [p for p in pool.map(lambda check: check(), checks) if p]
    if problems:
        raise PreflightError(problems)


def main() -> int:
    """``python -m optforge.flows.preflight``: check this environment, print the outcome, exit 0 or 1."""
    import sys

    try:
        check_environment()
    except PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("ok: every configured server answers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
