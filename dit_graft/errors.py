"""Errors a user can act on. Each carries the CLI exit code; the CLI prints one line, no traceback."""

from __future__ import annotations


class DitGraftError(Exception):
    """Base class: a one-line message naming what is wrong and where."""

    exit_code = 1


class RecipeError(DitGraftError):
    """A malformed recipe, a bad override, a selector or operator that does not fit the model (exit 2)."""

    exit_code = 2


class InputError(DitGraftError):
    """A bad command-line input: an output path equal to the input, a missing directory (exit 2)."""

    exit_code = 2


class IntegrityError(DitGraftError):
    """A missing, truncated, unsafe or mismatched checkpoint (exit 3)."""

    exit_code = 3


class DivergenceError(DitGraftError):
    """Non-finite losses the guard could not skip past (exit 4)."""

    exit_code = 4
