"""The session's one real ``opd serve-teacher``, as a pytest plugin: the teacher test modules load it with
``pytest_plugins = ["teacher_fixture"]``, so the fixture is defined once for the session and the server's ~1
minute start is paid once, not per module. (A plugin module, not a conftest fixture, so only those modules
start it.)"""

from __future__ import annotations

import secrets
import sys
import time

import pytest
import requests
from servers import (
    TEACHER_MAX_BODY,
    TEACHER_MAX_LEN,
    TEACHER_TOKEN_ENV,
    clean_env,
    free_port,
    group_alive,
    start,
    stop_group,
    tail,
)


@pytest.fixture(scope="session")
def teacher_server(tiny_models, tmp_path_factory):
    """``(url, token)`` of ``opd serve-teacher`` on the tiny teacher, with a token, a small body cap and model
    length."""
    port, token = free_port(), secrets.token_hex(8)
    log = tmp_path_factory.mktemp("serve") / "serve-teacher.log"
    cmd = [sys.executable, "-m", "opd.cli", "serve-teacher", str(tiny_models / "teacher"),
           "--port", str(port), "--token-env", TEACHER_TOKEN_ENV, "--max-model-len", str(TEACHER_MAX_LEN),
           "--max-body-bytes", str(TEACHER_MAX_BODY)]
    proc = start(cmd, log, clean_env(**{TEACHER_TOKEN_ENV: token}))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, f"serve-teacher exited with {proc.returncode}:\n{tail(log)}"
            assert time.time() < deadline, f"serve-teacher not healthy after 600 s:\n{tail(log)}"
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass  # not listening yet, or the proxy holds the request until the app is deployed
            time.sleep(2)
        yield url, token
    finally:
        stop_group(proc)
        assert not group_alive(proc.pid), "serve-teacher left processes behind"
