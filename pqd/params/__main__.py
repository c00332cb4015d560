"""``python -m pqd.params [params.yaml]``: validate every key, every path it names and the device, in one line.

Paths a pipeline stage makes (the ``outs`` of dvc.yaml next to the params file) are accepted before
they exist. Exit status 0 when valid, 2 with one line naming the key otherwise. ``make run`` runs
``python -m pqd.stages.preflight``, which adds the checks that need the eval layer (the reference set).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pqd.errors import ParamError
from pqd.params.load import check_params_file


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "params.yaml")
    try:
        check_params_file(path)
    except ParamError as e:
        print(f"pqd: error: {e}", file=sys.stderr)
        return 2
    print(f"pqd: {path} is valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
