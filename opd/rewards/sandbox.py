"""Run untrusted (model-written) Python in a separate, resource-limited process: ``run_sandboxed(code,
stdin)``.

What is in force (details and the gaps in ``docs/sandbox.md``):

* a fresh interpreter (``python -I``) in its own session / process group, a scrubbed environment (PATH, LANG,
  HOME and TMPDIR only) and a throw-away working directory that is deleted afterwards;
* rlimits set in the child before any model code runs: CPU seconds, address space, file size, processes, open
  files, no core dumps;
* when the parent is root, the child drops to a uid of its own (unique per run, no groups), so RLIMIT_NPROC
binds
  and the parent's files and ``/proc/<pid>/environ`` are off limits; at the end every process of that uid is
  killed, including ones that left the process group;
* a private view of the system when bubblewrap is installed (``opd.rewards.isolation``): its own mount, PID,
IPC
  and network namespaces, the host read-only, its own size-capped ``/tmp`` (the working directory) and
  ``/dev/shm``; else no network through a new network namespace (only a down loopback) when the kernel lets us
  make one, else an audit hook in the child that refuses sockets, process spawning and ctypes calls (not a
  boundary: see the docs). ``SandboxResult.network`` says which one a run had;
* a seccomp filter, last before the code runs: no new user namespaces and no ``AF_UNIX`` sockets.

Setup happens in a small bootstrap run by the child interpreter itself rather than in ``preexec_fn``: the
verifier hosts are multi-threaded, and Python code between fork and exec can deadlock there.

Try it: ``python -c "from opd.rewards.sandbox import run_sandboxed; print(run_sandboxed('print(input()*2)',
'ab'))"``
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import secrets
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

from opd.rewards.isolation import SANDBOX_ROOT, bwrap_argv, seccomp_program
from opd.rewards.sandbox_boot import BOOT as _BOOT

# Reasons that mean "the code hit a sandbox limit" (vs. it merely failed or exited non-zero).
LIMIT_REASONS = ("timeout", "cpu", "memory", "file size", "disk", "processes", "open files",
                 "output too large")
_UID_BASE = 1 << 31  # per-run uids: far above real users and the usual /etc/subuid ranges
_RUN_COUNTER = itertools.count()
_TOKEN_VAR = "OPD_SANDBOX_RUN"  # marks the run's processes (see _kill_all); not a secret


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. Memory is address space (RLIMIT_AS) per process; ``nproc`` counts threads too."""

    wall_s: float = 5.0
    cpu_s: float = 2.0
    memory_mb: int = 512
    file_size_mb: int = 16
    nproc: int = 8
    nofile: int = 64
    max_output_bytes: int = 64 * 1024
    # "auto": network namespace if possible, else the audit hook; "audit": always the hook
    network: str = "auto"
    python: str = ""  # interpreter to run; "" = the current one (sys.executable)
    # "auto": the private bubblewrap view when bwrap is installed (opd.rewards.isolation); "host": none
    view: str = "auto"
    disk_mb: int = 64  # bubblewrap view: size of its /tmp (the working directory) and of its /dev/shm
    files: int = 4096  # bubblewrap view, as root: inodes of each of those (files, directories, links)

    def validate(self) -> SandboxLimits:
        bad = [f"{f.name} must be > 0, got {getattr(self, f.name)!r}" for f in dataclasses.fields(self)
               if f.type in ("float", "int") and not getattr(self, f.name) > 0]
        if self.network not in ("auto", "audit"):
            bad.append(f"network must be 'auto' or 'audit', got {self.network!r}")
        if self.view not in ("auto", "host"):
            bad.append(f"view must be 'auto' or 'host', got {self.view!r}")
        if self.nproc < 2:
            bad.append(f"nproc must be >= 2 (the interpreter itself counts), got {self.nproc}")
        if bad:
            raise ValueError("sandbox limits: " + "; ".join(bad))
        return self

    def replace(self, **overrides: object) -> SandboxLimits:
        """A copy with some fields changed; unknown names are an error listing the valid ones."""
        names = {f.name: f.type for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"unknown sandbox limit(s) {unknown}; valid: {sorted(names)}")
        cast = {"float": float, "int": int, "str": str}
        try:
            typed = {k: cast[names[k]](v) for k, v in overrides.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"sandbox limits {overrides}: {e}") from e
        return dataclasses.replace(self, **typed).validate()


@dataclass
class SandboxResult:
    """What one sandboxed run did. ``reason`` is None for a clean exit 0, else why it did not (first the cause
    that ended it, then any limit its stderr shows, e.g. ``"timeout; processes"``)."""

    returncode: int | None  # exit status; None when killed by a signal
    signal: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    wall_s: float
    cpu_s: float
    timed_out: bool
    reason: str | None
    # "bwrap" (the private view, its own network namespace), "netns", "userns+netns" or "audit-hook"
    network: str
    uid: int | None  # the per-run uid when the parent was root, else None (ran as the caller)
    pid: int  # the child's pid = its process group and session id

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def limit_hit(self) -> bool:
        return self.reason is not None and any(r in LIMIT_REASONS for r in self.reason.split("; "))


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not the fault of the code it was asked to run)."""


def run_sandboxed(code: str, stdin: str = "", *, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as ``__main__`` with ``stdin``; never raises for anything the code does."""
    limits = (limits or SandboxLimits()).validate()
    python = limits.python or sys.executable
    uid = (_UID_BASE + ((os.getpid() & 0x3FFFFF) << 8 | next(_RUN_COUNTER) & 0xFF)
           if os.geteuid() == 0 else None)
    with tempfile.TemporaryDirectory(prefix="opd-sandbox-", ignore_cleanup_errors=True) as base:
        work, io_paths = _stage(base, code, stdin, uid)
        launch = _Launch.plan(limits, python, work, uid)
        run = launch.run(io_paths, limits.wall_s)
        stdout, out_size = _read_capped(io_paths[1], limits.max_output_bytes)
        stderr, err_size = _read_capped(io_paths[2], limits.max_output_bytes)
    if "network" not in run.setup and not run.timed_out:  # the bootstrap never reached the code
        raise SandboxError(f"sandbox setup failed: {run.setup.get('error') or stderr.strip()[-2000:]}")
    sig = os.WTERMSIG(run.status) if os.WIFSIGNALED(run.status) else None
    code_ = None if sig is not None else os.WEXITSTATUS(run.status)
    # bwrap exits 128 + its signal
    if launch.view and code_ is not None and code_ > 128 and run.setup.get("network"):
        sig, code_ = code_ - 128, None
    cpu = run.rusage.ru_utime + run.rusage.ru_stime if run.rusage else 0.0
    too_big = out_size > limits.max_output_bytes
    return SandboxResult(
        returncode=code_, signal=sig, stdout=stdout, stderr=stderr, stdout_truncated=too_big,
        stderr_truncated=err_size > limits.max_output_bytes, wall_s=run.wall_s, cpu_s=cpu,
        timed_out=run.timed_out, reason=_reason(code_, sig, run.timed_out, cpu, limits, stderr, too_big),
        network=run.setup.get("network", "?"), uid=uid, pid=run.pid,
    )


def _stage(base: str, code: str, stdin: str, uid: int | None) -> tuple[str, list[str]]:
    """The code's work directory (``main.py`` in it, owned by the sandbox user) and the stdin/stdout/stderr
    files."""
    os.chmod(base, 0o711)  # the child may traverse to its workdir (HOME is an absolute path) but not list
    work = os.path.join(base, "work")
    os.mkdir(work, 0o700)
    with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
        f.write(code)
    if uid is not None:
        for path in (work, os.path.join(work, "main.py")):
            os.chown(path, uid, uid)
    io_paths = [os.path.join(base, n) for n in ("stdin", "stdout", "stderr")]
    with open(io_paths[0], "w", encoding="utf-8") as f:
        f.write(stdin)
    return work, io_paths


@dataclass
class _Ran:
    status: int
    rusage: object
    timed_out: bool
    setup: dict  # what the bootstrap reported through the status pipe (network mode, user namespace, error)
    wall_s: float
    pid: int


@dataclass
class _Launch:
    """How the bootstrap starts: its argv prefix (the private view), its config, its environment."""

    python: str
    work: str
    view: list[str] | None
    cfg: dict
    env: dict
    token: str
    uid: int | None

    @classmethod
    def plan(cls, limits: SandboxLimits, python: str, work: str, uid: int | None) -> _Launch:
        # The private view (bubblewrap) needs the network namespace it makes; network=audit asks for the
        # fallback.
        view = bwrap_argv(python, os.path.join(work, "main.py"), limits.disk_mb, uid is not None) \
            if limits.view == "auto" and limits.network == "auto" else None
        seccomp = seccomp_program()
        cfg = {
            "uid": uid,
            "net": "bwrap" if view else limits.network,
            "nproc": limits.nproc,
            "preimport": uid is not None and not view and not _stdlib_world_readable(python),
            "rlimits": _rlimits(limits),
            "seccomp": seccomp.hex() if seccomp else None,
            # the remount needs the CAP_SYS_ADMIN bwrap keeps for root only (isolation.bwrap_argv)
            "tmpfs": ({"size": limits.disk_mb << 20, "inodes": limits.files} if view and uid is not None
                      else None),
        }
        token = secrets.token_hex(8)
        home = SANDBOX_ROOT if view else work
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home,
               _TOKEN_VAR: token}
        return cls(python, work, view, cfg, env, token, uid)

    def run(self, io_paths: list[str], wall_s: float) -> _Ran:
        """Start the bootstrap in its own session, wait up to ``wall_s``, then kill whatever it left
        behind."""
        status_r, status_w = os.pipe()
        cfg = {**self.cfg, "status_fd": status_w}
        with open(io_paths[0], "rb") as fin, open(io_paths[1], "wb") as fout, open(io_paths[2], "wb") as ferr:
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [*(self.view or []), self.python, "-I", "-c", _BOOT, json.dumps(cfg)],
                    stdin=fin, stdout=fout, stderr=ferr, cwd=self.work, env=self.env, start_new_session=True,
                    pass_fds=(status_w,), close_fds=True,
                )
            except OSError as e:
                os.close(status_r)
                raise SandboxError(f"cannot start the sandbox interpreter {self.python!r}: {e}") from e
            finally:
                os.close(status_w)
            try:
                status, rusage, timed_out = _wait(proc, wall_s)
            finally:
                # first: the status pipe below reads to EOF, which a live bootstrap would hold
                _killpg(proc.pid)
                with os.fdopen(status_r, "rb") as f:  # the child closed it before running the code
                    setup = json.loads(f.read() or b"{}")
                _kill_all(self.uid, setup.get("userns"), self.token)
            return _Ran(status, rusage, timed_out, setup, time.monotonic() - start, proc.pid)


def _rlimits(limits: SandboxLimits) -> dict[str, list[int]]:
    cpu = max(1, round(limits.cpu_s))
    mem = limits.memory_mb << 20
    fsize = max(limits.file_size_mb << 20, limits.max_output_bytes + 1)  # stdout is a file too
    # The hard CPU limit is one second above the soft one: SIGXCPU first, SIGKILL if the code ignores it.
    return {"CPU": [cpu, cpu + 1], "AS": [mem, mem], "FSIZE": [fsize, fsize], "NOFILE": [limits.nofile] * 2,
            "CORE": [0, 0]}


def _wait(proc: subprocess.Popen, wall_s: float):
    """Wait up to ``wall_s`` for the child: (wait status, rusage or None, timed out?). Reaps it either way."""
    deadline = time.monotonic() + wall_s
    timed_out = False
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (kernel < 5.3): poll
        pidfd = None
    try:
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                _killpg(proc.pid)
                pid, status, rusage = os.wait4(proc.pid, 0)
                break
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.005))
    finally:
        if pidfd is not None:
            os.close(pidfd)
    proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it; tell Popen so it does not try again
    return status, rusage, timed_out


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_all(uid: int | None, userns: str | None, token: str) -> None:
    """Kill what the run left behind, including processes that called setsid() to leave its process group.

    As root the run had a uid of its own: ``kill(-1)`` sent *as that uid* reaches all of them, and the kernel
    sends it while fork is locked out, so a fork bomb cannot outrun it. Without root, the run's processes are
    recognised by their user namespace, else by the marker in their initial environment; that sweep repeats
    until none is left (RLIMIT_NPROC keeps them few).
    """
    if uid is not None:
        subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[], env={},
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       cwd="/", check=False, close_fds=True)
        return
    marker = f"{_TOKEN_VAR}={token}".encode()

    def ours(pid: str) -> bool:
        if userns:
            return os.readlink(f"/proc/{pid}/ns/user") == userns
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")

    for _ in range(200):
        found = False
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and ours(pid) and _alive(pid):
                    os.kill(int(pid), signal.SIGKILL)
                    found = True
            except OSError:  # gone, or not ours to read
                pass
        if not found:
            return
        time.sleep(0.002)


def _alive(pid: str) -> bool:
    """Not a zombie (a killed process stays in /proc until its parent, maybe a slow init, reaps it)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


def _read_capped(path: str, cap: int) -> tuple[str, int]:
    with open(path, "rb") as f:
        data = f.read(cap)
    return data.decode("utf-8", errors="replace"), os.path.getsize(path)


_STDERR_LIMITS = (  # (reason, evidence in the child's stderr)
    ("memory", ("MemoryError", "Cannot allocate memory")),
    ("file size", ("[Errno 27]", "File too large")),
    ("disk", ("[Errno 28]", "No space left on device")),  # the private view's /tmp or /dev/shm is full
    ("processes", ("[Errno 11] Resource temporarily unavailable", "can't start new thread")),
    ("open files", ("[Errno 24]", "Too many open files")),
)


def _reason(code: int | None, sig: int | None, timed_out: bool, cpu: float, limits: SandboxLimits,
            stderr: str, too_big: bool) -> str | None:
    causes = []
    if timed_out:
        causes.append("timeout")
    elif sig in (signal.SIGXCPU,) or (sig == signal.SIGKILL and cpu >= round(limits.cpu_s)):
        causes.append("cpu")
    elif sig == signal.SIGXFSZ:
        causes.append("file size")
    elif sig is not None:
        causes.append(f"killed by signal {sig} ({signal.Signals(sig).name})")
    tail = stderr[-4000:]
    for reason, needles in _STDERR_LIMITS:
        if any(n in tail for n in needles) and reason not in causes:
            causes.append(reason)
    if too_big:
        causes.append("output too large")
    if not causes and code:
        causes.append(f"exit code {code}")
    return "; ".join(causes) or None


@lru_cache(maxsize=8)
def _stdlib_world_readable(python: str) -> bool:
    """Whether a uid other than ours can import the interpreter's stdlib (every directory up to it traversable
    by 'others'). When not (a pyenv under a 0700 /root), the child imports a set of common modules before it
    drops."""
    try:
        out = subprocess.run([python, "-I", "-S", "-c", "import os; print(os.path.dirname(os.__file__))"],
                             capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    path = os.path.realpath(out)
    while True:
        mode = os.stat(path).st_mode
        if not mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent
