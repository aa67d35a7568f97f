"""Other libraries' errors, retold in one line."""
from __future__ import annotations


def cause(error: BaseException) -> str:
    """The first line of a library's error message, ending in a full stop (or the error's type when
    it has no message): enough of transformers', datasets' or torch's explanation to say why, in
    a one-line refusal of our own."""
    text = str(error).strip()
    line = text.splitlines()[0].rstrip(". ") if text else type(error).__name__
    return line + "."
