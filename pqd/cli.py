"""The ``pqd`` command (``python -m pqd.cli``).

``pqd audit <export dir | models:/name@alias | models:/name/N> [--root PROJECT]`` re-verifies a release
(see :mod:`pqd.audit`), prints one line per check and a verdict, and exits 0 when every check passes,
1 on any mismatch, 2 when the target cannot be read at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _audit(target: str, root: str | None) -> int:
    from pqd import audit

    try:
        if target.startswith("models:/"):
            from pqd import tracking

            tracking.quiet_mlflow()
            try:
                findings, what = audit.audit_release(target, Path(root or "."))
            except tracking.ERRORS as e:
                raise ValueError(str(e)) from None
        else:
            export = Path(target)
            if not export.is_dir():
                raise ValueError(f"{target} is not allowed: expected an export folder or models:/<name>@<alias>")
            findings, what = audit.audit_export(export, Path(root) if root else None), str(export)
    except (ValueError, FileNotFoundError) as e:
        print(f"pqd audit: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"pqd audit: {what}")
    for f in findings:
        print(f"  {f.name:<13} {f.status:<4}  {f.detail}")
    failed = [f.name for f in findings if f.status == audit.FAIL]
    if failed:
        print(f"pqd audit: verdict: FAILED ({', '.join(failed)})", file=sys.stderr)
        return 1
    checked = [f.name for f in findings if f.status == audit.PASS]
    print(f"pqd audit: verdict: passed ({', '.join(checked)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pqd", description="PQD command line")
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("audit", help="re-verify a release: artifact hashes, source model hash, dvc.lock against "
                                     "the recorded commit, registry metrics against the release's evaluate.json")
    a.add_argument("target", help="an export folder, or models:/<name>@<alias> / models:/<name>/<version>")
    a.add_argument("--root", help="the release's project folder (dvc.yaml, git history, MLflow store); default: "
                                  "the export's project, or the current folder for a registry URI")
    args = ap.parse_args(argv)
    return _audit(args.target, args.root)


if __name__ == "__main__":
    raise SystemExit(main())
