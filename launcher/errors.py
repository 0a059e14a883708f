"""The launcher's own error type, so nothing in launcher/ needs the router to report a mistake.

``vllm_fleet.launcher.tiny_model`` is copied alone into the CPU engine image to build the test
model; with the error type here that copy is two files of launcher/, not a piece of the router as
well.
"""


class ConfigError(ValueError):
    """A bad flag, config-file value, inventory or model directory, found by the launcher.

    The message is one line naming the offending field and how to fix it; ``vllm-fleet``
    prints it without a traceback and exits with status 2 (as for the router's own
    ``vllm_fleet.router.errors.ConfigError``).
    """


class PlanError(ConfigError):
    """The model cannot be laid out on these GPUs (or an override contradicts them).

    The message is one line with the numbers (need X GiB, have Y GiB) and what to do instead.
    """
