"""The CLI's one error type."""


class SetupError(RuntimeError):
    """Something the user must fix before (or while) anything runs; the message names the fix."""
