"""``pqd-release``: the release gate, then registration of the result as the ``candidate`` version.

A failed gate stops the flow before any registry call, with the failed checks in one line. Moving
``production`` stays a separate, explicit command: ``python -m pqd.ops.release promote <name>``.
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow

from flows.tasks import register_candidate, release_gate
from pqd.ops.release import GateFailed
from pqd.ops.tracking import DEFAULT_EXPERIMENT, RegisteredVersion


@flow(name="pqd-release")
def release(root: str = ".", experiment: str = DEFAULT_EXPERIMENT, allow_uncommitted: bool = False) -> RegisteredVersion:
    """Gate the result in ``root``; when it passes, register it with the alias ``candidate``."""
    report = release_gate(root, allow_uncommitted)
    if not report.passed:
        raise GateFailed(report.summary())
    return register_candidate(root, experiment, allow_uncommitted)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.release [--root .]``."""
    ap = argparse.ArgumentParser(prog="python -m flows.release", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    ap.add_argument("--allow-uncommitted", action="store_true",
                    help="register even when dvc.lock is not the one committed at HEAD (tags and card say so)")
    args = ap.parse_args(argv)
    state = release(args.root, args.experiment, args.allow_uncommitted, return_state=True)
    if state.is_failed():
        print(f"pqd-release: {state.message}", file=sys.stderr)
        return 1
    v = state.result()
    print(f"pqd-release: {v.name} version {v.version} is '{v.alias}' "
          f"({'registered now' if v.created else 'already registered'}); "
          f"promote with: python -m pqd.ops.release promote {v.name} --version {v.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
