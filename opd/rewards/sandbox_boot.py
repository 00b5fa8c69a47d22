"""The sandboxed child's bootstrap (``opd.rewards.sandbox``), kept as source text: the child interpreter runs
it with
``python -I -c BOOT <json>`` before any model code."""

# The child's bootstrap: runs as `python -I -c BOOT <json>`, sets the sandbox up, then runs main.py as
# __main__. Order matters: the network namespace needs root (or a user namespace), so it comes before dropping
# the uid; RLIMIT_NPROC comes after it, since a new user namespace restarts the process count.
BOOT = r"""
import json, os, resource, sys
_cfg = json.loads(sys.argv[1])
_status = os.fdopen(_cfg["status_fd"], "w")
def _fail(msg):
    _status.write(json.dumps({"error": msg})); _status.close(); os._exit(125)
def _unshare(flags):
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).unshare(flags) == 0
    except Exception:
        return False
_net = "bwrap" if _cfg["net"] == "bwrap" else None
if _cfg["net"] == "auto" and os.geteuid() == 0 and _unshare(0x40000000):  # CLONE_NEWNET
    _net = "netns"
if _cfg["preimport"]:  # the stdlib is unreadable once we drop the uid: load the common modules now
    for _m in ("collections", "itertools", "functools", "heapq", "bisect", "math", "cmath", "re", "string",
               "json", "random", "fractions", "decimal", "statistics", "typing", "dataclasses", "copy",
               "operator", "array", "textwrap", "datetime", "enum", "traceback", "linecache", "unittest",
               "socket", "encodings.idna", "threading", "queue", "struct", "hashlib", "base64", "io", "time",
               "ast", "glob", "csv", "pickle", "shutil", "tempfile", "fnmatch", "copyreg", "zlib", "bz2",
               "lzma"):
        try:
            __import__(_m)
        except Exception:
            pass
if _cfg["seccomp"] or _cfg["tmpfs"]:
    import ctypes  # now: as root it may be unreadable once the uid drops
if _cfg["tmpfs"]:  # bwrap bounds the view's tmpfs in bytes only: add the inode bound, then give up the cap
    _libc = ctypes.CDLL(None, use_errno=True)
    _opts = "size={size},nr_inodes={inodes},mode=1777".format(**_cfg["tmpfs"]).encode()
    for _m in (b"/tmp", b"/dev/shm"):
        # MS_REMOUNT | MS_NOSUID | MS_NODEV: bwrap's own flags, kept
        if _libc.mount(b"tmpfs", _m, b"tmpfs", 32 | 2 | 4, _opts) != 0:
            _fail(f"remount {_m.decode()} with an inode bound: errno {ctypes.get_errno()}")
    if _libc.prctl(24, 21, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_SYS_ADMIN
        _fail(f"dropping CAP_SYS_ADMIN: errno {ctypes.get_errno()}")
    del _libc, _opts
if _cfg["uid"] is not None:
    try:
        os.setgroups([]); os.setgid(_cfg["uid"]); os.setuid(_cfg["uid"])
    except OSError as e:
        _fail(f"cannot switch to uid {_cfg['uid']} (a user-namespaced container?): {e}")
if _net is None and _cfg["net"] == "auto":
    _uid, _gid = os.getuid(), os.getgid()
    if _unshare(0x10000000 | 0x40000000):  # CLONE_NEWUSER | CLONE_NEWNET
        _net = "userns+netns"
        for _p, _v in (("setgroups", "deny"), ("uid_map", f"{_uid} {_uid} 1"),
                       ("gid_map", f"{_gid} {_gid} 1")):
            try:
                with open(f"/proc/self/{_p}", "w") as _f:
                    _f.write(_v)
            except OSError:
                pass
_nproc = _cfg["nproc"]
if _net not in ("userns+netns", "bwrap") and _cfg["uid"] is None and os.getuid() != 0:
    # The count is per user here, and the caller's other processes count too: allow that many more.
    _me = os.getuid()
    for _p in os.listdir("/proc"):
        try:
            with open(f"/proc/{_p}/status") as _f:
                _st = dict(l.split(":", 1) for l in _f if ":" in l)
            if int(_st["Uid"].split()[0]) == _me:
                _nproc += int(_st["Threads"])
        except (OSError, ValueError, KeyError):
            pass
try:
    for _k, _v in _cfg["rlimits"].items():
        _hard = resource.getrlimit(getattr(resource, "RLIMIT_" + _k))[1]
        _cap = lambda x: x if _hard == resource.RLIM_INFINITY else min(x, _hard)
        resource.setrlimit(getattr(resource, "RLIMIT_" + _k), (_cap(_v[0]), _cap(_v[1])))
    resource.setrlimit(resource.RLIMIT_NPROC, (_nproc, _nproc))
except (OSError, ValueError) as e:
    _fail(f"setrlimit: {e}")
os.umask(0o077)
if _net is None:
    _net = "audit-hook"
    def _hook(event, args, _deny=("socket.__new__", "socket.connect", "socket.bind", "os.system", "os.exec",
                                  "os.posix_spawn", "os.spawn", "subprocess.Popen", "ctypes.call_function")):
        if event in _deny:
            raise PermissionError(f"sandbox: {event} is blocked (no network namespace available)")
        # Same uid as the caller here: keep it out of other processes' /proc entries (environ, mem, ...).
        if event == "open" and isinstance(args[0], (str, bytes)):
            _parts = os.path.realpath(os.fsdecode(args[0])).split("/")
            if (len(_parts) > 2 and _parts[1] == "proc" and _parts[2].isdigit()
                    and int(_parts[2]) != os.getpid()):
                raise PermissionError(f"sandbox: {args[0]!r} is another process's /proc entry")
    sys.addaudithook(_hook)
if _cfg["seccomp"]:  # last: no user namespaces, no AF_UNIX sockets from here on (opd.rewards.isolation)
    _libc = ctypes.CDLL(None, use_errno=True)
    _prog = ctypes.create_string_buffer(bytes.fromhex(_cfg["seccomp"]))
    class _FProg(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    _fp = _FProg(len(_prog.raw) // 8, ctypes.addressof(_prog))
    # NO_NEW_PRIVS; SECCOMP
    if _libc.prctl(38, 1, 0, 0, 0) != 0 or _libc.prctl(22, 2, ctypes.byref(_fp), 0, 0) != 0:
        _fail(f"seccomp: errno {ctypes.get_errno()}")
    del _libc, _prog, _FProg, _fp
_status.write(json.dumps({"network": _net, "userns": os.readlink("/proc/self/ns/user")
                          if _net == "userns+netns" or (_net == "bwrap" and _cfg["uid"] is None) else None}))
_status.close()
del _cfg, _status
sys.argv = ["main.py"]
_main = type(sys)("__main__")
_main.__file__, _main.__builtins__ = "main.py", __builtins__
sys.modules["__main__"] = _main
with open("main.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f
exec(_code, _main.__dict__)
"""
