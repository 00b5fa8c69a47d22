"""The errors the CLI reports without a traceback, below every layer: bad input (``ConfigError``, exit 2) and
a teacher server that refused a request or stayed unreachable (``TeacherServerError``, exit 1: the job
stopped)."""


class ConfigError(ValueError):
    """Bad configuration; the message names every offending dotted key. The CLI exits with code 2."""


class TeacherServerError(RuntimeError):
    """The teacher server refused a request (4xx) or stayed unreachable until the retry deadline; names the
    URL."""
