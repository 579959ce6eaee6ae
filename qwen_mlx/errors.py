"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (bad config, missing file, bad record).
The CLI prints its message as one line and exits non-zero, with no traceback; anything
else is a bug in qwen-mlx and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; ``str(err)`` is the whole message, fix included."""

    exit_code = 1


class TrainingStopped(UserError):
    """Training stopped early (NaN loss, Ctrl-C); the message says how to go on."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
