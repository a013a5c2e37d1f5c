"""The CLI's rich consoles: plans, progress and errors on stderr, tables on stdout.

What they print is plain text. Paths, build names, model names and GGUF metadata come from users
and files, and rich would read "[/x]" in them as markup (a MarkupError traceback, or text silently
dropped) and ":smile:" as an emoji; colour is added only where the CLI asks for it by style. Lines
on stderr are not wrapped by rich (at 80 columns when stderr is a file or a pipe): a plan line or a
path stays one line in a log, and a terminal wraps it by itself.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import TextColumn
from rich.text import Text

stderr = Console(stderr=True, markup=False, emoji=False, highlight=False, soft_wrap=True)
stdout = Console(markup=False, emoji=False, highlight=False)


def labelled(label: str, style: str, message: str) -> Text:
    """``label`` in ``style``, then ``message`` as it is: "error: ..." in red, "stopped: ..." and the like."""
    return Text.assemble((label, style), " ", message)


def plain_column(template: str) -> TextColumn:
    """A progress-bar column that shows its fields (a target's label, a build stage) as plain text."""
    return TextColumn(template, markup=False)
