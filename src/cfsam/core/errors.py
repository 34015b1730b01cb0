"""The package's errors: what a user asked for, or what their machine lacks, as against a bug.

Every error the package raises on purpose is a ``CfsamError``: its message names the value and what is
allowed, or what is missing and the command that provides it. The CLI shows such a message on one line,
without a traceback; any other exception is a bug and keeps its traceback. Each one also derives from the
built-in it stands for (a bad value is a ``ValueError``), so callers that catch those keep working.
"""
from __future__ import annotations


class CfsamError(Exception):
    """An error the package raises on purpose, with a message for the user."""


class UsageError(CfsamError, ValueError):
    """A value the caller gave (an option, a name, a setting) that is not allowed here."""


class UnknownName(CfsamError, KeyError):
    """A name looked up in a registry that holds no such name."""

    def __str__(self) -> str:  # the message as written, not KeyError's repr of it
        return str(self.args[0]) if self.args else ""


class RunFailed(CfsamError, RuntimeError):
    """Work that could not be done as asked: a failed experiment or notebook, a missing tool, a failed check."""
