"""The ``pqd`` command (``python -m pqd.ops.cli``).

``pqd audit <export dir | models:/name@alias | models:/name/N> [--root PROJECT] [--remote] [--runtime R]``
re-verifies a release
(see :mod:`pqd.ops.audit`), prints one line per check and a verdict, and exits 0 when every check passes,
1 on any mismatch, 2 when the target cannot be read at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pqd.errors import InputError, command
from pqd.ops import audit, tracking


@command("pqd audit", tracking.ERRORS)
def _audit(target: str, root: str | None, from_remote: bool = False, runtime: str | None = None) -> int:
    if target.startswith("models:/"):
        tracking.quiet_mlflow()
        findings, what = audit.audit_release(target, Path(root or "."), from_remote, runtime)
    else:
        export = Path(target)
        if from_remote:
            raise InputError(f"pqd audit --remote {target}: expected a registered release (models:/<name>@<alias>): "
                             "the remote and output hashes are recorded with a release")
        if not export.is_dir():
            raise InputError(f"{target} is not allowed: expected an export folder or models:/<name>@<alias>")
        findings, what = audit.audit_export(export, Path(root) if root else None, runtime), str(export)
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
    a.add_argument("--remote", action="store_true",
                   help="also pull the release's outputs from the DVC remote it records and check their hashes")
    a.add_argument("--runtime", choices=["onnxruntime", "openvino"], default=None,
                   help="the runtime whose kernels are audited (every quantized layer on an integer kernel); default: "
                        "the one the release was evaluated in (evaluate.backend)")
    args = ap.parse_args(argv)
    return _audit(args.target, args.root, args.remote, args.runtime)


if __name__ == "__main__":
    raise SystemExit(main())
