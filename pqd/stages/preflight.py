"""``python -m pqd.stages.preflight [params.yaml]``: everything that can be checked before the first stage, in one
line (``make run``'s first step): the params layer's check plus what needs the eval layer, which pqd.params may not
import (the reference set, :mod:`pqd.eval.reference`; one a stage makes is checked by the evaluate stage).
"""

from __future__ import annotations

from pathlib import Path

from pqd.errors import command
from pqd.eval import fid, reference
from pqd.params import DEMO_SOURCES, Params
from pqd.params.__main__ import check_command
from pqd.params.load import check_params_file


def check_reference(p: Params) -> str:
    """A FeatureError when ``evaluate.reference`` cannot give reference statistics; else what was found."""
    spec = p.evaluate.reference
    path = Path(spec).expanduser()
    if spec in DEMO_SOURCES:
        return f"reference {spec} (embedded)"
    if not path.exists():  # a pipeline output (check_params_file accepted it): the evaluate stage checks it
        return f"reference {spec} (made by the pipeline)"
    if path.suffix == ".npz":
        dim = fid.feature_size(p.evaluate.features)
        reference.check_npz(spec, dim)
        return f"reference {spec} (mu and sigma of {dim if dim is not None else 'matching'}-d features)"
    return f"reference {spec} ({reference.check_image_folder(spec)} images)"


@command("pqd")
def main(argv: list[str] | None = None) -> int:
    return check_command(argv, lambda path: "; " + check_reference(check_params_file(path)))


if __name__ == "__main__":
    raise SystemExit(main())
