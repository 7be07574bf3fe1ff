"""Exceptions that fcflow shows to its users.

Every error a user can cause (a bad recipe, a missing file, a run on the wrong grid) is an
:class:`FcflowError`. The command line prints its message as one line and exits non-zero;
anything else is a bug and keeps its traceback.
"""


class FcflowError(Exception):
    """An error in fcflow's input that the user can fix; its message says how."""


class RecipeError(FcflowError, ValueError):
    """A study recipe that is not valid TOML or does not pass validation."""


class InputDataError(FcflowError, ValueError):
    """A BIDS or fMRIPrep input that is missing, malformed or inconsistent."""


class AtlasError(FcflowError):
    """An atlas that cannot be found, downloaded, verified or read."""


class OutputError(FcflowError, OSError):
    """An output that cannot be written: disk full, read-only or not a folder; names the file."""
