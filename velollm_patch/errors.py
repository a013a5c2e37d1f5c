"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""


class VelollmError(Exception):
    """A failure the user can act on.

    The message is a single line that says what is wrong and what to do about it; the CLI prints
    it without a traceback. ``exit_code`` lets callers distinguish kinds of failure in scripts.
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
