"""Configuration errors shared by every command-line entry point."""


class ConfigError(ValueError):
    """A bad flag, environment variable or config-file value.

    The message is one line naming the offending field and how to fix it; the CLI prints it
    without a traceback and exits with status 2.
    """
