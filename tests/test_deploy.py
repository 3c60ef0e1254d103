"""deploy/: every file parses and points at things that exist (no Docker engine runs here)."""

from __future__ import annotations

import configparser
import re
import tomllib
from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from quorum.server.app import create_app
from quorum.server.settings import Settings

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


def test_kubernetes_probes_hit_routes_the_server_answers(bundle_dir: Path):
    deployment = next(doc for _, doc in _yaml_documents() if doc.get("kind") == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    paths = {container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe")}
    assert paths == {"/v2/health/live", "/v2/health/ready"}
    with TestClient(create_app(Settings(bundle=bundle_dir))) as client:
        for path in paths | {deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]}:
            assert client.get(path).status_code == 200, path


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
    docs = [doc for _, doc in _yaml_documents()]
    deployment = next(doc for doc in docs if doc.get("kind") == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"] and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(env["QUORUM_ADMIN_PORT"]) == ports["admin"] != ports["http"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["admin"]  # metrics live on the admin port
    service = next(doc for doc in docs if doc.get("kind") == "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_both_images_check_their_health_and_compose_publishes_the_public_port_only():
    for name in ("Dockerfile", "Dockerfile.gpu"):
        assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*/v2/health/ready", (DEPLOY / name).read_text(), re.M), name
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["quorum"]
    assert service["ports"] == ["8000:8000"] and service["environment"]["QUORUM_ADMIN_PORT"] == "9000"
    assert service["cap_drop"] == ["ALL"] and service["read_only"] is True
