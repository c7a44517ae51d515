"""The deployment and infrastructure files are valid and agree with each other and with the code.

No engine is needed: Debian's ``docker-compose`` (1.29) validates a compose file offline; the
KubeRay and Prefect files are checked for the facts the stack depends on (same image, the shared
volume at the same path on every pod, the Ray version, the flow's parameters, a valid cron).
"""

import inspect
import shutil
import subprocess

import pytest
import ray
import yaml

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration

INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose.yaml"
SHARED = "/opt/optforge/.optforge"
SERVICES = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "deploy", "ray-head", "ray-worker",
            "prefect-worker"}
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose not installed (apt-get install docker-compose: Debian's 1.29 validates offline)")


def compose(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER_COMPOSE, "-f", str(COMPOSE), *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, check=False)


@needs_compose
def test_compose_file_is_valid_with_the_example_env():
    checked = compose("--env-file", str(INFRA / ".env.example"), "config", "-q")
    assert checked.returncode == 0, checked.stderr
    services = compose("--env-file", str(INFRA / ".env.example"), "config", "--services")
    assert set(services.stdout.split()) == SERVICES


@needs_compose
def test_compose_refuses_to_start_without_secrets(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    checked = compose("--env-file", str(empty), "config", "-q")
    assert checked.returncode != 0
    assert "POSTGRES_PASSWORD" in checked.stderr


@needs_compose
def test_compose_topology():
    out = compose("--env-file", str(INFRA / ".env.example"), "config")
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    mlflow = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql+psycopg2://" in mlflow
    assert "--serve-artifacts" in mlflow and "--artifacts-destination=s3://" in mlflow
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")
    assert services["ray-worker"]["deploy"]["replicas"] >= 2
    worker = services["prefect-worker"]["environment"]
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["RAY_ADDRESS"] == "ray-head:6379"
    images = {services[s]["image"] for s in ("mlflow", "prefect-server", "ray-head", "ray-worker", "prefect-worker")}
    assert len(images) == 1  # one optforge image: driver and Ray nodes must match
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        assert f"optforge-shared:{SHARED}:rw" in services[name]["volumes"], name
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"


def test_kuberay_manifest():
    claim, cluster = yaml.safe_load_all((INFRA / "kuberay" / "raycluster.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    assert workers["replicas"] >= 2
    (worker_pod,) = yaml.safe_load_all((INFRA / "kuberay" / "prefect-worker.yaml").read_text())
    pods = [head["template"]["spec"], workers["template"]["spec"], worker_pod["spec"]["template"]["spec"]]
    assert len({c["image"] for pod in pods for c in pod["containers"]}) == 1
    for pod in pods:
        claims = {v["name"] for v in pod["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == "optforge-shared"}
        mounts = {(m["name"], m["mountPath"]) for m in pod["containers"][0]["volumeMounts"]}
        assert any((name, SHARED) in mounts for name in claims)
    driver_args = worker_pod["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert f"--address={cluster['metadata']['name']}-head-svc:6379" in driver_args


def test_prefect_yaml_matches_the_flow():
    from prefect.schedules import Cron

    from optforge.flows.optimize import optimize
    from optforge.flows.params import PipelineConfig, load_config
    from optforge.flows.tune import tune

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    nightly, weekly = spec["deployments"]
    path, _, name = nightly["entrypoint"].partition(":")
    assert (ROOT / path).is_file() and name == optimize.fn.__name__
    assert set(nightly["parameters"]) == set(inspect.signature(optimize.fn).parameters) - {"config_path"}
    PipelineConfig.model_validate(nightly["parameters"]["config"])  # the typed default is a valid config
    assert nightly["enforce_parameter_schema"] is True
    # The search: its entry point, parameters the flow takes, a config (and overrides) that load.
    path, _, name = weekly["entrypoint"].partition(":")
    assert (ROOT / path).is_file() and name == tune.fn.__name__
    # A file config and overrides, not the typed one (that is the Python API's, optforge.tune).
    assert set(weekly["parameters"]) == set(inspect.signature(tune.fn).parameters) - {"config"}
    load_config(ROOT / weekly["parameters"]["config_path"], weekly["parameters"]["overrides"])
    for deployment in (nightly, weekly):
        for schedule in deployment["schedules"]:
            Cron(schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron or time zone
        assert deployment["work_pool"]["name"] == "optforge-process"
    (pull,) = spec["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $OPTFORGE_HOME }}"
    readme = (INFRA / "README.md").read_text()
    assert "prefect deploy --prefect-file deployments/prefect.yaml --all" in readme
