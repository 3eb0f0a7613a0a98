"""The error a user can fix: a configuration value, file or checkpoint that cannot work. A leaf: imports nothing of ddpm."""
from __future__ import annotations

from typing import NamedTuple


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and what is accepted."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, whitespace collapsed (its type name when the message is empty)."""
    return " ".join(str(e).strip().split("\n")[0].split()) or type(e).__name__


class RankFailed(RuntimeError):
    """An error other than a ConfigError that one rank of a distributed run raised in work all ranks do together,
    raised on every rank with one message: the rank, the original's type and the first line of its message."""


class Failure(NamedTuple):
    """What one rank tells the others of its error: small and picklable, whatever the error holds."""

    rank: int
    type_name: str
    line: str
    user_error: bool  # a ConfigError (ddpm.data.DataError included): the user's to fix, one `error:` line

    @classmethod
    def of(cls, error: BaseException, rank: int) -> "Failure":
        return cls(rank, type(error).__name__, first_line(error), isinstance(error, ConfigError))

    def exception(self) -> Exception:
        """The error every rank raises: the same ConfigError line for a user error, else RankFailed naming the rank."""
        if self.user_error:
            return ConfigError(self.line)
        return RankFailed(f"rank {self.rank}: {self.type_name}: {self.line}")
