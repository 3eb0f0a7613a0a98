"""The error a user can fix: a configuration value, file or checkpoint that cannot work. A leaf: imports nothing of ddpm."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and what is accepted."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, whitespace collapsed (its type name when the message is empty)."""
    return " ".join(str(e).strip().split("\n")[0].split()) or type(e).__name__
