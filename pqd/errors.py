"""The product's own error types: the errors a user can fix, each with a one-line message.

Every stage, command and flow turns a :class:`PqdError` into one line and a non-zero exit status; any
other exception is a bug and keeps its traceback. Each type also derives from the builtin it refines,
so ``except ValueError`` around a library call keeps working. :func:`command` is that one-line shell, used
by every ``python -m pqd...`` entry point. Bottom of the import graph: imports only the standard library.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, ParamSpec

P = ParamSpec("P")


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


def command(prog: str, errors: tuple[type[BaseException], ...] = (PqdError,)
            ) -> Callable[[Callable[P, int]], Callable[P, int]]:
    """Decorate a command's ``main``: an error of ``errors`` (the user's to fix) becomes one line on stderr,
    ``<prog>: error: <first line>``, and exit status 2; with ``PQD_DEBUG`` set it keeps its traceback.
    Any other exception is a bug and keeps its traceback."""
    def wrap(main: Callable[P, int]) -> Callable[P, int]:
        @functools.wraps(main)
        def run(*args: P.args, **kwargs: P.kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except errors as e:
                if os.environ.get("PQD_DEBUG"):
                    raise
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                return 2
        return run
    return wrap
