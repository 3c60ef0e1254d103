"""deploy/: every file parses and points at things that exist (no Docker engine runs here)."""

from __future__ import annotations

import configparser
import re
import tomllib
from pathlib import Path

import yaml
from fastapi.testclient import TestClient
from httpx2 import ASGITransport

from quorum.server.app import create_app, create_gateway_app
from quorum.server.settings import GatewaySettings, Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROOT = DEPLOY.parent


def _yaml_documents() -> list[tuple[Path, dict]]:
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 2
    return [(f, doc) for f in files for doc in yaml.safe_load_all(f.read_text()) if doc is not None]


def test_every_yaml_file_parses_into_mappings():
    docs = _yaml_documents()
    assert all(isinstance(doc, dict) for _, doc in docs)
    kinds = {doc.get("kind") for _, doc in docs}
    assert {"Deployment", "Service"} <= kinds


def _workloads() -> list[dict]:
    """Every Deployment and StatefulSet of deploy/kubernetes/."""
    return [doc for _, doc in _yaml_documents() if doc.get("kind") in ("Deployment", "StatefulSet")]


def test_kubernetes_probes_hit_routes_the_server_and_the_gateway_answer(bundle_dir: Path):
    workloads = _workloads()
    assert {w["metadata"]["name"] for w in workloads} == {"quorum", "quorum-shard", "quorum-gateway"}
    paths = {"/v2/health/live", "/v2/health/ready", "/metrics"}
    with TestClient(create_app(Settings(bundle=bundle_dir))) as server:
        answers = {path for path in paths if server.get(path).status_code == 200}
        gateway = create_gateway_app(
            GatewaySettings(shards=["http://shard"]), {"http://shard": ASGITransport(server.app)}
        )
        with TestClient(gateway) as client:
            answers &= {path for path in paths if client.get(path).status_code == 200}
    for workload in workloads:
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert (
            workload["spec"]["selector"]["matchLabels"].items()
            <= workload["spec"]["template"]["metadata"]["labels"].items()
        )
        probed = {container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe", "startupProbe")}
        probed.add(workload["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
        assert probed <= answers, workload["metadata"]["name"]


def _package_folders() -> set[str]:
    """The top-level folders that setuptools installs as quorum's subpackages."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {path.split("/")[0] for path in config["tool"]["setuptools"]["package-dir"].values()}


def test_dockerfiles_copy_what_exists_and_run_the_server():
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DEPLOY / name).read_text()
        sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
        assert sources and all((ROOT / src).exists() for src in sources), sources
        assert _package_folders() <= set(sources), f"{name} must copy every package folder of pyproject.toml"
        assert 'CMD ["quorum", "serve", "/bundle"]' in text and re.search(r"^USER \w+", text, re.M)
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    build = compose["services"]["quorum"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()


def test_systemd_unit_parses():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "quorum.service").read_text())
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    assert "quorum serve" in unit["Service"]["ExecStart"]


def test_kubernetes_pods_run_with_least_privilege_and_keep_admin_off_the_service():
    for workload in _workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        context = pod["securityContext"]
        assert context["runAsNonRoot"] and context["seccompProfile"]["type"] == "RuntimeDefault"
        container = pod["containers"][0]
        security = container["securityContext"]
        assert security["capabilities"]["drop"] == ["ALL"] and security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        env = {e["name"]: e.get("value") for e in container["env"]}
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert int(env["QUORUM_ADMIN_PORT"]) == ports["admin"] != ports["http"]
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == ports["admin"]  # metrics live on the admin port
    services = [doc for _, doc in _yaml_documents() if doc.get("kind") == "Service"]
    assert len(services) == 3
    for service in services:
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def _kubernetes(kind: str, name: str) -> dict:
    return next(doc for _, doc in _yaml_documents() if doc.get("kind") == kind and doc["metadata"]["name"] == name)


def test_the_sharded_kubernetes_files_give_every_shard_one_quarter_and_the_gateway_every_shard():
    shards = _kubernetes("StatefulSet", "quorum-shard")
    n = shards["spec"]["replicas"]
    command = " ".join(shards["spec"]["template"]["spec"]["containers"][0]["command"])
    assert f'--shard "$((POD_INDEX + 1))/{n}"' in command and "quorum serve /bundle" in command
    assert _kubernetes("Service", shards["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    gateway = _kubernetes("Deployment", "quorum-gateway")["spec"]["template"]["spec"]["containers"][0]["args"]
    urls = [gateway[i + 1] for i, a in enumerate(gateway) if a == "--shard"]
    assert urls == [f"http://quorum-shard-{i}.quorum-shard:8000" for i in range(n)]
    budgets = {
        doc["metadata"]["name"]: doc["spec"] for _, doc in _yaml_documents() if doc.get("kind") == "PodDisruptionBudget"
    }
    assert budgets["quorum-shard"]["maxUnavailable"] == 1 and budgets["quorum-gateway"]["minAvailable"] >= 1
    for name, budget in budgets.items():
        assert budget["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}


def test_the_sharded_compose_file_serves_every_module_once_behind_the_gateway():
    services = yaml.safe_load((DEPLOY / "docker-compose.shards.yml").read_text())["services"]
    shards = {name: s for name, s in services.items() if name.startswith("shard-")}
    parts = sorted(s["command"][s["command"].index("--shard") + 1] for s in shards.values())
    assert parts == [f"{i}/{len(shards)}" for i in range(1, len(shards) + 1)] and len(shards) == 4
    gateway = services["gateway"]["command"]
    assert gateway[:2] == ["quorum", "gateway"]
    assert [gateway[i + 1] for i, a in enumerate(gateway) if a == "--shard"] == [f"http://{n}:8000" for n in shards]
    for name, service in services.items():
        assert service["cap_drop"] == ["ALL"] and service["read_only"] is True, name
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert ("ports" in service) == (name == "gateway")  # shards stay on the compose network


def test_both_images_check_their_health_and_compose_publishes_the_public_port_only():
    for name in ("Dockerfile", "Dockerfile.gpu"):
        assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*/v2/health/ready", (DEPLOY / name).read_text(), re.M), name
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["quorum"]
    assert service["ports"] == ["8000:8000"] and service["environment"]["QUORUM_ADMIN_PORT"] == "9000"
    assert service["cap_drop"] == ["ALL"] and service["read_only"] is True
