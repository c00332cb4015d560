"""``python -m pqd.stages.preflight [params.yaml]``: everything that can be checked before the first stage, in one line.

``make run``'s first step (the Makefile's ``check-params``). It runs the params layer's check
(:func:`pqd.params.load.check_params_file`: every key, every path, the device) and adds what needs the eval layer,
which pqd.params may not import: the reference set of ``evaluate.reference`` holds images clean-fid can read, or
is a ``.npz`` with ``mu`` and ``sigma`` of the extractor's feature size (:mod:`pqd.eval.reference`). A reference
that a stage makes (a dvc.yaml output, absent before its stage runs) is checked by the evaluate stage, which runs
the same check before it samples. Exit status 0 when all is well, 2 with one line otherwise; nothing is written.
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
