"""The sandbox's private view of the system: a bubblewrap command line and a seccomp filter.

* ``bwrap_argv``: with ``bwrap`` (Debian's ``bubblewrap``) on PATH, every run gets its own mount, PID, IPC,
UTS and
  network namespaces: the host filesystem read-only, fresh size-capped tmpfs on ``/tmp`` and ``/dev/shm``
  (thrown away with the run; the working directory lives in the ``/tmp`` one, so the quota covers everything
  it can write),
  ``/run`` and ``/var/tmp`` empty, its own ``/proc``. A directory on the interpreter's path that other users
  cannot traverse (a Python under a 0700 ``/root``) is replaced by an empty tmpfs with only the interpreter
  bound into it, so the sandbox's uid can read its standard library and nothing else there.
* ``seccomp_program``: a classic-BPF filter the child installs (with ``no_new_privs``) right before the code
runs:
  no new user namespaces (``unshare``/``clone`` with ``CLONE_NEWUSER``, ``setns``; ``clone3`` answers ENOSYS
  so libc falls back to ``clone``, whose flags the filter can read), no ``AF_UNIX`` sockets (host daemons'
  sockets are reachable wherever their files are, whatever the mount flags), no kernel keyrings and no
  io_uring, and no x32 system calls (a second syscall table).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import struct
import subprocess
import sys
from functools import lru_cache

CLONE_NEWUSER = 0x10000000
AF_UNIX = 1
# (AUDIT_ARCH_*, system call numbers) per machine; other machines run without the filter (docs/sandbox.md).
_ARCH = {
    "x86_64": (0xC000003E, {"unshare": 272, "clone": 56, "clone3": 435, "setns": 308, "socket": 41,
                            "add_key": 248, "request_key": 249, "keyctl": 250, "io_uring_setup": 425,
                            "io_uring_enter": 426, "io_uring_register": 427}),
    "aarch64": (0xC00000B7, {"unshare": 97, "clone": 220, "clone3": 435, "setns": 268, "socket": 198,
                             "add_key": 217, "request_key": 218, "keyctl": 219, "io_uring_setup": 425,
                             "io_uring_enter": 426, "io_uring_register": 427}),
}
# Refused outright with EPERM, as container runtimes' default profiles do: kernel keyrings are not namespaced
# (a key added here is visible to the host user's other processes), and io_uring's socket and connect
# operations never pass through the socket() check below.
_REFUSED = ("setns", "add_key", "request_key", "keyctl", "io_uring_setup", "io_uring_enter",
            "io_uring_register")
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL = 0x7FFF0000, 0x80000000
_ERRNO = 0x00050000  # | errno
EPERM, ENOSYS = 1, 38
_X32_BIT = 0x40000000
SANDBOX_ROOT = "/tmp/work"
# Replaced by empty tmpfs in the view: /tmp and /dev/shm (size-capped, writable), /run and /var/tmp (where
# host daemons keep sockets and state)
_MASKED = ("/tmp", "/dev/shm", "/run", "/var/tmp")
logger = logging.getLogger(__name__)  # the run's working directory inside the bubblewrap view


def seccomp_program(machine: str | None = None) -> bytes | None:
    """The filter as packed ``struct sock_filter`` entries, or None for a machine without a table here."""
    if (machine or os.uname().machine) not in _ARCH:
        return None
    arch, nr = _ARCH[machine or os.uname().machine]
    # seccomp_data: int nr @0, u32 arch @4, u64 ip @8, u64 args[6] @16 (args[0]'s low word first:
    # little-endian).
    prog = [(_LD_W_ABS, 0, 0, 4), (_JEQ, 1, 0, arch), (_RET, 0, 0, _KILL), (_LD_W_ABS, 0, 0, 0),
            (_JGE, 0, 1, _X32_BIT), (_RET, 0, 0, _ERRNO | EPERM),
            (_JEQ, 0, 1, nr["clone3"]), (_RET, 0, 0, _ERRNO | ENOSYS)]
    for name in _REFUSED:
        prog += [(_JEQ, 0, 1, nr[name]), (_RET, 0, 0, _ERRNO | EPERM)]
    for name, test, k in (("unshare", _JSET, CLONE_NEWUSER), ("clone", _JSET, CLONE_NEWUSER),
                          ("socket", _JEQ, AF_UNIX)):
        # not this call: skip its 4 instructions; else load args[0] and refuse when it matches
        prog += [(_JEQ, 0, 4, nr[name]), (_LD_W_ABS, 0, 0, 16), (test, 0, 1, k), (_RET, 0, 0, _ERRNO | EPERM),
                 (_RET, 0, 0, _ALLOW)]
    prog.append((_RET, 0, 0, _ALLOW))
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


@lru_cache(maxsize=1)
def bwrap_path() -> str | None:
    """``bwrap`` when it is installed and can make its namespaces here (a container's seccomp profile or a
    kernel without unprivileged user namespaces can forbid them), else None: the sandbox then runs without the
    view."""
    bw = shutil.which("bwrap", path=os.environ.get("PATH", "") + ":/usr/bin:/bin")
    if bw is None:
        return None
    probe = [bw, "--die-with-parent", "--unshare-pid", "--unshare-net", "--ro-bind", "/", "/",
             "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "true"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if not ok:
        logger.warning("bwrap is installed but cannot create its namespaces here; the code sandbox runs "
                       "without its private view (docs/sandbox.md)")
    return bw if ok else None


def _closed_ancestor(path: str) -> str | None:
    """The topmost directory above ``path`` that other users cannot traverse, or None."""
    parts = os.path.realpath(path).split("/")[1:]
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d
    return None


def interpreter_dirs(python: str) -> list[str]:
    """What the interpreter needs to start and import: its own directory, its prefix and base prefix (a venv's
    ``sys.prefix`` and the Python it was made from)."""
    dirs = sorted({os.path.realpath(d) for d in (os.path.dirname(os.path.realpath(python)), sys.prefix,
                                                   sys.base_prefix, os.path.dirname(python))})
    # a directory inside another goes with it
    return [d for d in dirs if not any(d.startswith(o + "/") for o in dirs)]


def bwrap_argv(python: str, main_py: str, disk_mb: int, root: bool) -> list[str] | None:
    """The ``bwrap`` command line that runs ``python`` in the private view (None without bwrap). ``main_py``
    is bound read-only into the view's working directory; ``root``: the caller is root (the child drops to its
    own uid inside, which needs CAP_SETUID/CAP_SETGID until then; bwrap otherwise drops every capability)."""
    bw = bwrap_path()
    if bw is None:
        return None
    size = str(disk_mb << 20)
    argv = [bw, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
            "--unshare-cgroup-try", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    for m in _MASKED:
        writable = m in ("/tmp", "/dev/shm")
        argv += [*(["--size", size] if writable else []), "--perms", "1777" if writable else "0755",
                 "--tmpfs", m]
    closed = sorted({a for d in interpreter_dirs(python) if (a := _closed_ancestor(d))})
    made = set(closed)
    for a in closed:
        argv += ["--perms", "0755", "--tmpfs", a]
    hidden = [*_MASKED, *closed]  # an interpreter (a venv) under one of these is bound back in, read-only
    for d in interpreter_dirs(python):
        a = next((a for a in hidden if d.startswith(a + "/")), None)
        if a is None:
            continue
        parts = d[len(a) + 1:].split("/")
        for i in range(1, len(parts)):  # bwrap would make the directories in between 0700
            between = f"{a}/{'/'.join(parts[:i])}"
            if between not in made:
                made.add(between)
                argv += ["--perms", "0755", "--dir", between]
        argv += ["--ro-bind", d, d]
    argv += ["--perms", "1777", "--dir", SANDBOX_ROOT, "--ro-bind", main_py, f"{SANDBOX_ROOT}/main.py",
             "--chdir", SANDBOX_ROOT]
    if root:
        # CAP_SYS_ADMIN: the bootstrap remounts /tmp and /dev/shm with an inode bound (bwrap's --size bounds
        # only bytes), then drops it from the bounding set before the uid switch clears the rest.
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SYS_ADMIN"]
    return [*argv, "--"]
