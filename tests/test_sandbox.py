"""The code sandbox against hostile snippets (each contained and reported), and ``code_exec`` end to end.

Everything runs for real: child interpreters with real rlimits, a real listener on 127.0.0.1, the real
``VerifierRunner`` on the session's local Ray. What is enforced depends on who runs the tests: as root the
child gets a uid of its own (file permissions then protect the test's files); as another user it cannot, and
the two file tests are expected failures there (docs/sandbox.md, "What it does not do").
"""

from __future__ import annotations

import os
import select
import socket
import time

import pytest

from opd.rewards.code_exec import extract_code, parse_tests
from opd.rewards.sandbox import SandboxLimits, SandboxResult, run_sandboxed

ROOT = os.geteuid() == 0
FAST = SandboxLimits(wall_s=3.0, cpu_s=1.0)
# "auto" = a network namespace where the kernel allows one; "audit" = the fallback
NETWORKS = ["auto", "audit"]


def _live(pid: str) -> tuple[int, int] | None:
    """(session id, real uid) of a live (non-zombie) process, else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration, IndexError):
        return None
    return None if fields[0] in (b"Z", b"X") else (int(fields[3]), uid)


def _leftovers(result: SandboxResult, extra_pids: tuple[int, ...] = ()) -> list[int]:
    """Processes of the run still alive, after giving SIGKILLs already sent a moment to land."""
    deadline = time.monotonic() + 5
    while True:
        left = []
        for pid in os.listdir("/proc"):
            info = _live(pid) if pid.isdigit() else None
            if info and (info[0] == result.pid or info[1] == result.uid or int(pid) in extra_pids):
                left.append(int(pid))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_benign_snippet_passes_in_a_scrubbed_throwaway_directory(monkeypatch):
    monkeypatch.setenv("OPD_TEST_SECRET", "hunter2")
    code = "import os\nprint(input()[::-1])\nprint(os.getcwd())\nprint(sorted(os.environ))"
    r = run_sandboxed(code, "abc\n")
    assert r.ok and r.reason is None and r.returncode == 0, r
    reversed_, cwd, env = r.stdout.splitlines()
    assert reversed_ == "cba"
    extra = ["PWD"] if r.network == "bwrap" else []  # bubblewrap's --chdir sets it (to the private /tmp/work)
    assert env == str(sorted(["HOME", "LANG", "OPD_SANDBOX_RUN", "PATH", "TMPDIR", *extra]))
    assert r.network != "bwrap" or cwd == "/tmp/work"  # inside its own /tmp, gone with it
    assert r.network == "bwrap" or not os.path.exists(cwd)  # the working directory is gone
    assert (r.uid is not None) == ROOT


def test_infinite_loop_hits_the_cpu_limit():
    r = run_sandboxed("while True:\n    pass", limits=SandboxLimits(wall_s=60.0, cpu_s=1.0))
    assert r.reason == "cpu" and r.limit_hit and r.signal is not None, r


def test_sleeper_hits_the_wall_clock_timeout():
    r = run_sandboxed("import time\ntime.sleep(600)", limits=SandboxLimits(wall_s=1.0))
    assert r.timed_out and r.reason == "timeout" and r.limit_hit, r
    assert not _leftovers(r)


def test_ten_gigabyte_allocation_hits_the_memory_limit():
    r = run_sandboxed("x = bytearray(10 * 1024**3)\nprint('allocated')")
    assert r.reason == "memory" and "allocated" not in r.stdout, r


def test_fork_bomb_is_contained_and_leaves_nothing_behind():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run_sandboxed(bomb, limits=FAST)
    assert r.timed_out and r.limit_hit, r
    assert not _leftovers(r)
    assert run_sandboxed("print('still usable')").stdout == "still usable\n"


def test_process_cap_binds_even_for_root():
    code = (
        "import os, time\nn = 0\nfor _ in range(40):\n    try:\n        if os.fork() == 0:\n"
        "            time.sleep(30)\n            os._exit(0)\n        n += 1\n    except OSError:\n"
        "        break\nprint(n)"
    )
    r = run_sandboxed(code, limits=SandboxLimits(nproc=6))
    assert r.returncode == 0, r
    assert int(r.stdout) < 6  # the interpreter itself is one of the six
    assert not _leftovers(r)  # the sleeping children were killed with the run


def test_process_that_leaves_the_group_is_killed_too():
    code = "import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    time.sleep(60)\nprint(pid)"
    r = run_sandboxed(code)
    assert r.returncode == 0, r
    inner = r.network == "bwrap"  # its own PID namespace: the printed pid is not the host's; the uid finds it
    assert not _leftovers(r, extra_pids=() if inner else (int(r.stdout),))


@pytest.mark.parametrize("network", NETWORKS)
def test_no_connection_reaches_a_real_listener(network):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        code = (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "print('connected')")
        r = run_sandboxed(code, limits=SandboxLimits(network=network))
        assert "connected" not in r.stdout and r.returncode == 1, r
        # bubblewrap's network namespace has its own loopback up, where nothing listens
        expect = {"bwrap": "Connection refused", "netns": "Network is unreachable",
                  "userns+netns": "Network is unreachable"}.get(r.network, "blocked")
        assert expect in r.stderr, r
        assert select.select([listener], [], [], 0.5)[0] == []  # nothing ever knocked
    if network == "audit":
        assert r.network == "audit-hook"
        # A child process would not carry the hook, so the fallback blocks spawning too.
        spawn = run_sandboxed("import os\nos.system('true')", limits=SandboxLimits(network=network))
        assert "os.system is blocked" in spawn.stderr, spawn


@pytest.mark.parametrize("network", NETWORKS)
def test_parent_environment_secret_is_not_readable(monkeypatch, network):
    monkeypatch.setenv("OPD_TEST_SECRET", "hunter2-env")
    code = (
        "import os\nprint(os.environ.get('OPD_TEST_SECRET'))\n"
        f"for pid in (os.getppid(), {os.getpid()}):\n"
        "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n        print('denied', type(e).__name__)\n"
    )
    r = run_sandboxed(code, limits=SandboxLimits(network=network))
    assert r.returncode == 0, r
    assert "hunter2-env" not in r.stdout
    # In the private view the parent is bubblewrap's init (root's) and the caller is not in its /proc at all.
    denied = ["denied PermissionError",
              "denied FileNotFoundError" if r.network == "bwrap" else "denied PermissionError"]
    assert r.stdout.splitlines() == ["None", *denied]


def test_file_outside_the_workdir_cannot_be_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2-file")
    secret.chmod(0o600)
    r = run_sandboxed(f"print(open({str(secret)!r}).read())")
    if not ROOT:
        pytest.xfail("without root the child runs as the caller and can read whatever the caller can")
    assert "hunter2-file" not in r.stdout and _denied(r), r


def test_file_outside_the_workdir_cannot_be_written(tmp_path):
    target = tmp_path / "planted.txt"
    r = run_sandboxed(f"open({str(target)!r}, 'w').write('pwned')\nprint('wrote')")
    if not ROOT:
        pytest.xfail("without root the child runs as the caller and can write wherever the caller can")
    assert not target.exists() and _denied(r), r


def _denied(r: SandboxResult) -> bool:
    """Refused (another uid's file), absent (the private view hides the host's /tmp) or a read-only mount."""
    return any(x in r.stderr for x in ("PermissionError", "FileNotFoundError", "Read-only file system"))


def test_huge_file_hits_the_file_size_limit():
    code = "with open('big', 'wb') as f:\n    for _ in range(64):\n        f.write(b'x' * (1 << 20))"
    r = run_sandboxed(code, limits=SandboxLimits(file_size_mb=4))
    assert r.reason == "file size" and r.limit_hit, r


def test_output_flood_is_truncated_and_reported():
    r = run_sandboxed("while True:\n    print('y' * 1000)",
                      limits=SandboxLimits(max_output_bytes=4096, wall_s=3))
    assert "output too large" in r.reason and r.stdout_truncated and len(r.stdout) == 4096, r


def test_signal_death_is_reported():
    r = run_sandboxed("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")
    assert r.signal == 15 and r.reason == "killed by signal 15 (SIGTERM)" and not r.limit_hit, r


def test_limits_reject_bad_values_by_name():
    with pytest.raises(ValueError, match="memory_mb must be > 0"):
        SandboxLimits(memory_mb=0).validate()
    with pytest.raises(ValueError, match=r"unknown sandbox limit\(s\) \['memroy_mb'\]"):
        SandboxLimits().replace(memroy_mb=1)
    with pytest.raises(ValueError, match="network must be"):
        SandboxLimits().replace(network="none")


# ---------------------------------------------------------------- code_exec


def test_extract_code_and_parse_tests():
    assert extract_code("talk\n```python\nx = 1\n```\nmore\n```py\nx = 2\n```\n") == "x = 2\n"
    assert extract_code("```python\nprint(1)\n") == "print(1)\n"  # cut off before the closing fence
    assert extract_code("print(3)") == "print(3)"
    assert parse_tests('[{"input": "1", "output": "2"}]') == [{"input": "1", "output": "2"}]
    assert parse_tests("assert f(1) == 2") == ["assert f(1) == 2"]
    for bad, msg in [([], "non-empty"), ([{"input": "1"}], "case 0"), ("x = 1", "at least one"),
                     ("[1", "JSON")]:
        with pytest.raises(ValueError, match=msg):
            parse_tests(bad)


ADD_IO = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6"}]
ADD_ASSERTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\n"
ROWS = [  # (completion, tests, expected score)
    ("Here:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```", ADD_IO, 1.0),
    ("```python\nprint(input())\n```", ADD_IO, 0.0),
    ("```python\nprint(5)\n```", ADD_IO, 0.5),
    ("def add(a, b):\n    return a + b if a != 2 else 0", ADD_ASSERTS, 2 / 3),
    ("```python\nimport os\nwhile True:\n    os.fork()\n```", ADD_IO, 0.0),
    ("```python\nimport sys\nprint('\\n' * 3)\nsys.exit(0)\n```", ADD_ASSERTS, 0.0),  # skipping the asserts
]


def test_code_exec_through_the_verifier_runner(local_ray):
    from opd.rewards import VerifierRunner, VerifierSpec

    completions = [c for c, _, _ in ROWS] + ["print(1)"]
    tests = [t for _, t, _ in ROWS] + [[{"input": "1"}]]  # the last cell is malformed
    n = len(completions)
    runner = VerifierRunner(
        [VerifierSpec("code_exec", kwargs={"timeout_s": 2, "cpu_s": 1, "workers": 4})], timeout_s=120,
        chunk_size=n
    )
    out = runner.score([f"u{i}" for i in range(n)], [""] * n, completions, {"tests": tests})
    assert out.per_verifier["code_exec"][:-1] == pytest.approx([s for _, _, s in ROWS])
    assert out.correct[:2] == [True, False]
    assert set(out.failures) == {f"u{n - 1}"} and "row 6" in out.failures[f"u{n - 1}"], out.failures
