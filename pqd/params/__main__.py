"""``python -m pqd.params [params.yaml]``: validate every key, every path it names and the device, in one line.

Exit status 0 when valid, 2 with one line naming the key otherwise. ``make run`` runs ``python -m
pqd.stages.preflight``, which adds the checks that need the eval layer (the reference set).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from pqd.errors import command
from pqd.params.load import check_params_file


def check_command(argv: list[str] | None, check: Callable[[Path], str]) -> int:
    """A check command's body: ``check(params file)`` says what it found (a PqdError propagates: the caller's
    :func:`~pqd.errors.command` makes it one line and exit status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "params.yaml")
    print(f"pqd: {path} is valid{check(path)}")
    return 0


def _check(path: Path) -> str:
    check_params_file(path)
    return ""


@command("pqd")
def main(argv: list[str] | None = None) -> int:
    return check_command(argv, _check)


if __name__ == "__main__":
    raise SystemExit(main())
