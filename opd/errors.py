"""The error every layer raises for bad input: below the config, so models, monitors and roles can raise it
without importing the config tree."""


class ConfigError(ValueError):
    """Bad configuration; the message names every offending dotted key. The CLI exits with code 2."""
