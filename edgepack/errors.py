"""Errors that reach users: each carries the process exit code of DESIGN.md section 6."""

from __future__ import annotations


class EdgepackError(Exception):
    """Base class for errors meant for users: one clear sentence, no traceback."""

    exit_code = 2


class UsageError(EdgepackError):
    """Bad usage or bad input: a missing path, an unknown option, a malformed value (exit 2)."""

    exit_code = 2


class PluginError(EdgepackError):
    """A plugin is broken or conflicts with another (exit 2)."""

    exit_code = 2


class VerificationError(EdgepackError):
    """A bundle failed a verification or smoke check (exit 1)."""

    exit_code = 1


class NoPlanFits(EdgepackError):
    """No candidate plan fits the memory budget and the fidelity floor (exit 3)."""

    exit_code = 3
