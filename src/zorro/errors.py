"""The suite's errors, at the bottom of the layers so every module can raise them: train.py and evaluate.py print
each as one line (`Error in config: ...` exit 2, `Error in data: ...` exit 3) instead of a traceback."""


class ConfigError(ValueError):
    """A config value that cannot work (a bad key, a path that does not exist, a value out of range)."""


class DataError(RuntimeError):
    """Too much of the data is unreadable (data.max_bad_fraction), or an evaluation scored fewer clips than its
    split holds."""
