"""The sandbox's private view and seccomp filter against hostile snippets: user namespaces, files that outlive
the run, a full /tmp, host Unix sockets, and correct code that must score as correct (docs/sandbox.md's
table)."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from opd.rewards.code_exec import InterpreterCrash, code_exec
from opd.rewards.isolation import bwrap_path, seccomp_program
from opd.rewards.sandbox import SandboxError, SandboxLimits, _stdlib_world_readable, run_sandboxed

VIEWS = ["auto", "host"]  # "auto": bubblewrap's private view where installed; "host": the fallback without it
needs_bwrap = pytest.mark.skipif(bwrap_path() is None,
                                 reason="bwrap not installed (Debian package bubblewrap; "
                                 "scripts/install.sh installs it when run as root)")
needs_seccomp = pytest.mark.skipif(seccomp_program() is None,
                                   reason=f"no seccomp table for {os.uname().machine}")


@needs_bwrap
def test_the_default_run_is_in_the_private_view():
    assert run_sandboxed("print(1)").network == "bwrap"


@needs_seccomp
@pytest.mark.parametrize("view", VIEWS)
def test_no_user_namespace_can_be_made_inside(view):
    marker = f"/tmp/opd-userns-{secrets.token_hex(4)}"
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER
        # raw clone(CLONE_NEWUSER|SIGCHLD)
        "print(libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0), ctypes.get_errno())\n"
        f"os.system('touch {marker}')\n"
    )
    r = run_sandboxed(code, limits=SandboxLimits(view=view))
    lines = r.stdout.split("\n")
    assert lines[:2] == ["-1 1", "-1 1"], r  # EPERM, both ways
    if r.network == "bwrap":
        assert not os.path.exists(marker)  # the shell ran in the private /tmp
    # without the view the host's /tmp is world-writable to it too (docs/sandbox.md: not enforced there)
    else:
        Path(marker).unlink(missing_ok=True)


@needs_bwrap
def test_files_in_tmp_and_shm_do_not_outlive_the_run_nor_reach_host_directories():
    token = secrets.token_hex(4)
    # like Ray's world-writable session directories
    shared = Path(tempfile.mkdtemp(prefix="opd-ray-session-"))
    shared.chmod(0o777)
    try:
        code = (f"import os\nfor p in ('/tmp/{token}', '/dev/shm/{token}', "
                f"'/var/tmp/{token}', '{shared}/{token}'):\n"
                "    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n"
                "    except OSError as e:\n        print('refused', p, type(e).__name__)\n")
        r = run_sandboxed(code)
        assert r.returncode == 0, r
        assert f"refused {shared}/{token}" in r.stdout  # the host's /tmp is not in the view at all
        for p in (f"/tmp/{token}", f"/dev/shm/{token}", f"/var/tmp/{token}", f"{shared}/{token}"):
            assert not os.path.exists(p), p
    finally:
        shared.rmdir()


@needs_bwrap
def test_the_view_has_a_quota_on_everything_written():
    code = ("for i in range(8):\n    with open(f'f{i}', 'wb') as f:\n        f.write(b'x' * (1 << 20))\n"
            "print('all written')")
    r = run_sandboxed(code, limits=SandboxLimits(disk_mb=4, file_size_mb=2))
    # each file under the per-file cap
    assert "all written" not in r.stdout and r.reason == "disk" and r.limit_hit, r


@needs_seccomp
@pytest.mark.parametrize("view", VIEWS)
def test_a_world_writable_host_unix_socket_is_unreachable(view):
    # visible in the view (read-only)
    where = Path(tempfile.mkdtemp(dir=Path(__file__).parent, prefix=".sock-"))
    where.chmod(0o755)
    path = where / "s"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        path.chmod(0o777)
        server.listen(1)
        server.settimeout(0.5)
        code = (f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\n"
                "print('connected')")
        r = run_sandboxed(code, limits=SandboxLimits(view=view))
        assert "connected" not in r.stdout and "Operation not permitted" in r.stderr, r
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever knocked
    path.unlink()
    where.rmdir()


@pytest.mark.parametrize("view", VIEWS)
def test_correct_code_using_the_standard_library_and_numpy_scores_as_correct(view):
    code = ("```python\nimport glob, csv, pickle, shutil, io\nimport numpy as np\n"
            "print(int(np.sum([int(x) for x in input().split()])))\n```")
    tests = [[{"input": "2 3", "output": "5"}, {"input": "10 -4", "output": "6"}]]
    without_view = view == "host" or bwrap_path() is None
    if without_view and os.geteuid() == 0 and not _stdlib_world_readable(sys.executable):
        # This machine's case (a Python under a 0700 /root): without the view the per-run uid cannot read what
        # numpy imports, so correct code would fail; the self-test says so instead of scoring it 0.
        with pytest.raises(SandboxError, match="code_exec self-test"):
            code_exec(["add"], [code], tests=tests, view=view)
        return
    assert code_exec(["add"], [code], tests=tests, view=view) == [1.0]


def test_an_interpreter_crash_is_a_verifier_failure_not_a_wrong_answer():
    crash = "import ctypes\nctypes.string_at(0)"
    out = code_exec(["p"], [crash], tests=[[{"input": "", "output": "x"}]])
    assert isinstance(out[0], InterpreterCrash) and "SIGSEGV" in str(out[0])


def test_a_sandbox_where_correct_code_fails_raises_at_the_self_test():
    with pytest.raises(SandboxError, match="code_exec self-test: a correct program importing glob"):
        # the interpreter cannot start
        code_exec(["p"], ["print(1)"], tests=[[{"input": "", "output": "1"}]], memory_mb=16)


@needs_seccomp
@pytest.mark.parametrize("view", VIEWS)
def test_kernel_keyrings_and_io_uring_are_refused(view):
    # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0): keyrings are not namespaced; io_uring_setup
    # would hand out socket/connect operations the socket() check never sees
    nr = {"x86_64": (250, 248, 425), "aarch64": (219, 217, 425)}[os.uname().machine]
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"print(libc.syscall({nr[0]}, 0, -3, 0), ctypes.get_errno())\n"
            f"print(libc.syscall({nr[1]}, b'user', b'opd', b'x', 1, -3), ctypes.get_errno())\n"
            "params = ctypes.create_string_buffer(120)\n"
            f"print(libc.syscall({nr[2]}, 4, params), ctypes.get_errno())\n")
    r = run_sandboxed(code, limits=SandboxLimits(view=view))
    assert r.stdout.split("\n")[:3] == ["-1 1"] * 3, r  # EPERM each


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="the inode bound needs the view run as root (docs/sandbox.md)")
def test_the_view_bounds_the_number_of_files_not_only_bytes():
    code = ("import os\nn = 0\ntry:\n    for n in range(60000):\n        open(f'f{n}', 'w').close()\n"
            "except OSError as e:\n    print('stopped', n, e.errno)\nelse:\n    print('made', n + 1)\n")
    r = run_sandboxed(code, limits=SandboxLimits(files=512))
    assert r.stdout.startswith("stopped"), r
    made, errno = map(int, r.stdout.split()[1:3])
    assert errno == 28 and 400 < made <= 512, r  # ENOSPC near the bound (the directory itself counts)
