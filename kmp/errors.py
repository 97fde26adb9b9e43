"""The two errors that are not kmp's bugs: a user's mistake, and a run that cannot go on.

kmp's own checks raise `UserError` with a message that says what was received and what to do,
without assuming how the value was given; `field` names the setting (a config field) when one
is at fault. A training run that breaks beyond what kmp may repair (an overflow storm past the
skip budget, a recovery that ran out of attempts) raises `TrainingStopped`. The `kmp` command
turns exactly these into one line (naming the option, `--seq-len` for the field `seq_len`) and
exit status 2; any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A user's mistake, with a message saying what was received and what to do instead.

    A ValueError, so code that catches Keras's own ValueErrors for bad arguments catches it too.

    Args:
        message: str. What was received and what to do instead.
        field: str or None. The setting at fault (e.g. "seq_len"), if any. Defaults to None.

    Example:
    >>> try:
    ...     raise UserError("Unknown precision 'fp8'. Use one of: auto, float32.")
    ... except ValueError as e:
    ...     print(e)
    Unknown precision 'fp8'. Use one of: auto, float32.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class TrainingStopped(RuntimeError):
    """A run that broke and cannot go on, with a message saying what happened and what to try.

    Example:
    >>> issubclass(TrainingStopped, RuntimeError)
    True
    """
