"""The one exception type for mistakes a person can fix.

Bad settings, data, workdirs, checkpoints and command lines raise :class:`UserError` with one
sentence that names the problem and the fix; the scripts print it as a single ``error:`` line
and exit with code 2, having written nothing. Every other exception is a bug (in stm_jax, or
in a researcher's own edit of it) and keeps its traceback, so it is never raised for these.

Functions below the entry points (``train_and_evaluate``, ``evaluate_workdir``,
``load_trained``, ``sample``, ``reproduce``) raise ``ValueError`` for arguments no valid
config can produce: those are programming errors too.
"""


class UserError(Exception):
    """A mistake the user can fix; the message says what and how."""
