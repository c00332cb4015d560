"""``python -m pqd.params [params.yaml]``: validate every key and every path it names, in one line.

Paths a pipeline stage makes (the ``outs`` of dvc.yaml next to the params file) are accepted before
they exist. Exit status 0 when valid, 2 with one line naming the key otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from pqd.errors import ParamError, command
from pqd.params.load import check_paths, load_params


def pipeline_outputs(dvc_yaml: Path) -> tuple[str, ...]:
    """Every ``outs`` path of the stages in ``dvc_yaml`` (none when there is no such file)."""
    if not dvc_yaml.is_file():
        return ()
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    outs = [o if isinstance(o, str) else next(iter(o)) for st in stages.values() for o in st.get("outs", [])]
    return tuple(outs)


@command("pqd", (ParamError,))
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "params.yaml")
    check_paths(load_params(path), pipeline_outputs(path.parent / "dvc.yaml"))
    print(f"pqd: {path} is valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
