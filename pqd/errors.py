"""The product's own error types: the errors a user can fix, each with a one-line message.

Every stage, command and flow turns a :class:`PqdError` into one line and a non-zero exit status; any
other exception is a bug and keeps its traceback. Each type also derives from the builtin it refines,
so ``except ValueError`` around a library call keeps working. Bottom of the import graph: imports nothing.
"""

from __future__ import annotations


class PqdError(Exception):
    """An error the user can fix (a setting, an input, an environment). The message is one line."""


class ParamError(PqdError, ValueError):
    """A parameter that is not allowed: names the dotted key, the bad value and what is allowed."""


class InputError(PqdError, ValueError):
    """An input file or folder that is missing, damaged, or not what the stage expects."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder that does not exist."""


class ModelFolderError(InputError):
    """A model folder that is not a usable diffusers pipeline."""


class FeatureError(InputError):
    """A feature extractor or reference set that cannot be used for FID."""


class ArtifactError(InputError):
    """An export folder that cannot be trusted or read."""


class NumericalError(PqdError, FloatingPointError):
    """Non-finite values or an integer overflow; the message names the layer (and time step or group)."""


class HubError(PqdError, ConnectionError):
    """A model hub that cannot be reached, or a model it cannot give."""


class TrackingError(PqdError, RuntimeError):
    """Tracking cannot proceed (server unreachable, no result to track)."""


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
