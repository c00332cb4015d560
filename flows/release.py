"""``pqd-release``: the release gate, then registration of the result as the ``candidate`` version.

A failed gate stops the flow before any registry call, with the failed checks in one line. Moving
``production`` stays a separate, explicit command: ``python -m pqd.release promote <name>``.
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow

from flows.tasks import register_candidate, release_gate
from pqd.release import GateFailed
from pqd.tracking import DEFAULT_EXPERIMENT, RegisteredVersion


@flow(name="pqd-release")
def release(root: str = ".", experiment: str = DEFAULT_EXPERIMENT) -> RegisteredVersion:
    """Gate the result in ``root``; when it passes, register it with the alias ``candidate``."""
    report = release_gate(root)
    if not report.passed:
        raise GateFailed(report.summary())
    return register_candidate(root, experiment)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.release [--root .]``."""
    ap = argparse.ArgumentParser(prog="python -m flows.release", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    args = ap.parse_args(argv)
    state = release(args.root, args.experiment, return_state=True)
    if state.is_failed():
        print(f"pqd-release: {state.message}", file=sys.stderr)
        return 1
    v = state.result()
    print(f"pqd-release: {v.name} version {v.version} is '{v.alias}' "
          f"({'registered now' if v.created else 'already registered'}); "
          f"promote with: python -m pqd.release promote {v.name} --version {v.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
