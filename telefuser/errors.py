"""User-facing errors: each one is a clear paragraph the CLI prints before exiting with code 2."""

from __future__ import annotations


class TeleFuserError(Exception):
    """Bad input (recipe, plan, weights, arguments): never a bug in TeleFuser itself."""

    exit_code = 2


class RecipeError(TeleFuserError):
    """A recipe that cannot be read, parsed or validated."""


class WeightsError(TeleFuserError):
    """Weight files that are missing, unreadable, or contradict the recipe or plan."""


class PlanError(TeleFuserError):
    """A plan that is malformed, tampered with, stale, or cannot run on this machine."""


class OutOfMemory(TeleFuserError):
    """The device ran out of memory while executing a plan."""


class ParameterError(TeleFuserError):
    """A run parameter the plan does not accept (telefuser-run's options, `Pipeline.run`'s arguments)."""


class OutputPathError(TeleFuserError):
    """An output path that cannot be written."""
