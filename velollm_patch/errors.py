"""The one exception type the CLI turns into a one-line message and a non-zero exit code, and how text
from users and files may appear inside such a message."""

# What an error quotes from a file or a server (a GGUF key, a model name, a response body): enough
# to recognise it, never the megabytes a corrupt length field can point at.
QUOTE_LIMIT = 80
# What an error quotes of a message a server or a library wrote: those explain themselves in a sentence or two.
MESSAGE_LIMIT = 300


class VelollmError(Exception):
    """A failure the user can act on.

    The message is a single line that says what is wrong and what to do about it; the CLI prints
    it without a traceback. ``exit_code`` lets callers distinguish kinds of failure in scripts.
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def plain(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` made safe to quote on one line: control characters escaped (a newline in a name would
    split the message) and at most ``limit`` characters kept, the rest counted rather than copied."""
    escaped = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    if len(text) <= limit:
        return escaped
    return f"{escaped}… ({len(text):,} characters in all)"


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A server's or a library's message on one line: runs of whitespace (newlines included) become
    one space, and the result is cut as :func:`plain` cuts."""
    return plain(" ".join(text.split()), limit)
