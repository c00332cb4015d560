"""Releases: the quality gate, registration (the model card is :mod:`pqd.ops.card`) and ``python -m pqd.ops.release``.

A release is the current pipeline result, gated and registered in the MLflow Model Registry as a version of
``pqd-<model>-w<W>a<A>`` with the alias ``candidate``. The gate's checks are in docs/operations.md; the quality
checks judge intervals of paired statistics against the model's own numbers, so one setting holds for FID scales
of any feature extractor. A failed gate registers nothing and names the failed checks in one line. Moving
``production`` is a separate, explicit command (``promote``). Registry operations go through :mod:`pqd.ops.tracking`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pqd.deploy.kernels import KernelAudit
from pqd.errors import PqdError, command, one_line
from pqd.formats.export import verify_manifest
from pqd.formats.lineage import git_commit, git_file, lock_ties_metrics
from pqd.formats.metrics import EvaluateMetrics, ExportMetrics, Interval
from pqd.ops import remote, tracking
from pqd.ops.card import PRODUCTION, model_card
from pqd.ops.result import Result, flat_params, lineage_tags, model_slug, read_result
from pqd.params import ReleaseParams, as_dict, params_from_dict, read_yaml

CANDIDATE = "candidate"
GATE_KEYS = tuple(f.name for f in dataclasses.fields(ReleaseParams))  # release.*: each a --<key> override
DOUBLED_ERROR_DB = 10 * math.log10(2)  # a PSNR this much lower: twice the mean squared error


# ---- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateSettings:
    """The gate's thresholds (``release.*``, defaults from pqd.params) and where they came from (for the card)."""

    thresholds: ReleaseParams
    source: str


def settings_with(base: GateSettings, overrides: dict[str, Any]) -> GateSettings:
    """``base`` with command-line overrides, checked by the same rules as ``release.*`` in params.yaml."""
    values = {**as_dict(base.thresholds), **overrides}
    return GateSettings(params_from_dict({"release": values}).release, f"{base.source} + command line {overrides}")


def load_settings(params_file: str | Path = "params.yaml") -> GateSettings:
    """``release.*`` from params.yaml (validated with every other key by pqd.params)."""
    data = read_yaml(params_file)
    rp = params_from_dict(data).release
    return GateSettings(rp, "params.yaml" if isinstance(data, dict) and data.get("release") else "defaults")


# ---- the gate --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    waived: bool = False  # failed, but the user explicitly allowed it (recorded in the tags and the card)

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "waived" if self.waived else "FAIL"


@dataclass(frozen=True)
class GateReport:
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed or c.waived for c in self.checks)

    @property
    def waived(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.checks if c.waived and not c.passed)

    def summary(self) -> str:
        """One line: 'passed' or the failed checks with their reasons."""
        if self.passed:
            waived = f" (waived: {', '.join(self.waived)})" if self.waived else ""
            return "release gate passed: " + ", ".join(c.name for c in self.checks if c.passed) + waived
        return "release gate failed: " + "; ".join(f"{c.name}: {c.detail}" for c in self.checks
                                                   if not (c.passed or c.waived))


# evaluate.json keys of the quality checks, for the message when they are missing
_QUALITY_KEYS = ("delta_fid_ci", "fid_fp_vs_ref", "fid_quant_vs_fp_ci", "noise_floor", "psnr_mean_ci",
                 "psnr_other_seed_mean")


def _unusable(ev: EvaluateMetrics) -> list[str]:
    """The keys of _QUALITY_KEYS whose value (or an interval bound) is missing or not finite."""
    bad = []
    for k in _QUALITY_KEYS:
        v = getattr(ev, k)
        values = (v.lo, v.hi) if isinstance(v, Interval) else (v,)
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in values):
            bad.append(f"{k} = {v}")
    return bad


@dataclass(frozen=True)
class GateStatistics:
    """What the quality checks compare with ``release.*``, each named after its threshold: ΔFID's upper bound / FID(FP,
    reference), FID(quantized, FP)'s upper bound / noise floor, mean PSNR's lower bound - FP images of other seeds."""

    delta_fid_fraction: float
    fid_vs_fp_fraction: float
    psnr_margin_db: float


def _ratio(x: float, y: float) -> float:
    return x / y if y > 0 else math.inf


def gate_statistics(ev: EvaluateMetrics | None) -> GateStatistics | None:
    """The gate's statistics of an evaluation (:func:`quality_checks`); None without finite intervals."""
    if ev is None or _unusable(ev):
        return None
    return GateStatistics(_ratio(ev.delta_fid_ci.hi, ev.fid_fp_vs_ref), _ratio(ev.fid_quant_vs_fp_ci.hi, ev.noise_floor),
                          ev.psnr_mean_ci.lo - ev.psnr_other_seed_mean)


def quality_checks(ev: EvaluateMetrics | None, rp: ReleaseParams) -> list[Check]:
    """The three quality checks on the evaluation's intervals (:func:`gate_statistics`), each against the model's
    own numbers."""
    names = ("delta_fid", "fid_vs_fp", "psnr")
    bad = ["evaluate.json is missing"] if ev is None else _unusable(ev)
    if bad:
        why = (f"no finite {', '.join(bad)} in evaluate.json: the gate judges intervals; set evaluate.bootstrap "
               ">= 100 and re-run evaluate (dvc repro)")
        return [Check(n, False, why) for n in names]
    d, f, q, st = ev.delta_fid_ci, ev.fid_quant_vs_fp_ci, ev.psnr_mean_ci, gate_statistics(ev)
    ok = (st.delta_fid_fraction <= rp.delta_fid_fraction, st.fid_vs_fp_fraction <= rp.fid_vs_fp_fraction,
          st.psnr_margin_db >= rp.psnr_margin_db)
    return [
        Check("delta_fid", ok[0],
              f"ΔFID {ev.delta_fid:.4g} {d}: upper bound {'<=' if ok[0] else '>'} release.delta_fid_fraction "
              f"{rp.delta_fid_fraction:g} x FID FP vs reference {ev.fid_fp_vs_ref:.4g} "
              f"= {rp.delta_fid_fraction * ev.fid_fp_vs_ref:.4g}"),
        Check("fid_vs_fp", ok[1],
              f"FID quantized vs FP {ev.fid_quant_vs_fp:.4g} {f}: upper bound {'<=' if ok[1] else '>'} "
              f"release.fid_vs_fp_fraction {rp.fid_vs_fp_fraction:g} x noise floor {ev.noise_floor:.4g} "
              f"= {rp.fid_vs_fp_fraction * ev.noise_floor:.4g}"),
        Check("psnr", ok[2],
              f"mean PSNR vs FP {ev.psnr_mean:.2f} dB [{q.lo:.2f}, {q.hi:.2f}]: lower bound "
              f"{'>=' if ok[2] else '<'} FP images of other seeds {ev.psnr_other_seed_mean:.2f} dB + "
              f"release.psnr_margin_db {rp.psnr_margin_db:g} = {ev.psnr_other_seed_mean + rp.psnr_margin_db:.2f} dB"),
    ]


def deployment_check(ev: EvaluateMetrics | None) -> Check:
    """The deployed ONNX graphs against the simulated model they were calibrated as, judged by the model's own
    numbers: their FID to each other within the noise floor (two FP sample sets differ by that much), and the
    deployed images at most twice as far from FP (median per-image MSE) as the simulated ones, i.e. the
    deployment adds no more error than quantization itself did (PSNR at most 10 log10 2 = 3.01 dB lower)."""
    if ev is None:
        return Check("deployment", False, "evaluate.json is missing: run dvc repro")
    if ev.fid_deployed_vs_simulated is None or ev.psnr_simulated_median is None:
        return Check("deployment", True, "no deployed graphs were evaluated (evaluate.backend = torch): "
                                         "the release ships the torch model")
    fid_ok = ev.fid_deployed_vs_simulated <= ev.noise_floor
    psnr_ok = ev.psnr_median >= ev.psnr_simulated_median - DOUBLED_ERROR_DB
    return Check("deployment", fid_ok and psnr_ok,
                 f"FID deployed vs simulated {ev.fid_deployed_vs_simulated:.4g} {'<=' if fid_ok else '>'} noise floor "
                 f"{ev.noise_floor:.4g}; median PSNR vs FP deployed {ev.psnr_median:.2f} dB "
                 f"{'>=' if psnr_ok else '<'} simulated {ev.psnr_simulated_median:.2f} - {DOUBLED_ERROR_DB:.2f} dB "
                 f"(deployed vs simulated {ev.psnr_deployed_vs_simulated_median:.2f} dB)")


def kernels_check(ex: ExportMetrics | None, backend: str) -> Check:
    """The export's kernel audit (pqd.deploy.kernels): every quantized layer runs on an integer kernel in the runtime
    the evaluation used (every audited runtime when it used torch). A fallback to float is refused, by name."""
    if ex is None:
        return Check("kernels", False, "export.json is missing: run dvc repro")
    if not ex.onnx_graphs:
        return Check("kernels", True, "no ONNX graphs were exported (export.onnx = false): the release ships the "
                                      "torch model")
    audits = {r: a for r, a in (ex.onnx_kernels or {}).items() if isinstance(a, dict) and "fallbacks" in a}
    judged = [backend] if backend in audits else list(audits)
    if not judged:
        return Check("kernels", False, "the export records no kernel audit: rerun the export stage (dvc repro)")
    found = [KernelAudit.from_dict(audits[r]) for r in judged]
    return Check("kernels", not any(a.fallbacks for a in found), "; ".join(a.line() for a in found))


def committed_check(r: Result, allow_uncommitted: bool) -> Check:
    """The audit's lineage rule, before registering: the result's dvc.lock is the one committed at HEAD (so the
    recorded commit reproduces it). Waived, not passed, with ``allow_uncommitted``."""
    head = git_commit(r.root).commit
    at_head = git_file(r.root, head, "dvc.lock") if head else None
    if r.lock is not None and at_head is not None and yaml.safe_load(at_head) == r.lock:
        return Check("committed", True, f"dvc.lock is the one committed at {head[:12]}")
    why = ("not a git work tree" if head is None else "dvc.lock is not committed at HEAD" if at_head is None
           else f"dvc.lock differs from the one committed at {head[:12]}")
    return Check("committed", False, f"{why}: commit dvc.lock first (git add dvc.lock && git commit), or register "
                                     "with --allow-uncommitted (stated in the tags and the model card)",
                 waived=allow_uncommitted)


def lineage_check(r: Result) -> Check:
    """dvc.lock ties the evaluation in the work tree to its export."""
    if r.lock is None:
        return Check("lineage", False, "dvc.lock is missing: run the pipeline with dvc repro (make run)")
    tied, detail = lock_ties_metrics(r.lock, r.options, r.root / r.options["evaluate"]["metrics"])
    return Check("lineage", tied, detail)


def gate(r: Result, s: GateSettings, allow_uncommitted: bool = False) -> GateReport:
    """All checks (none stops the others, so the report names every failure)."""
    try:
        files = verify_manifest(r.export_dir).get("files", {})
        hashes = Check("hashes", True, f"{len(files)} files match manifest.json")
    except PqdError as e:
        hashes = Check("hashes", False, one_line(e))
    return GateReport((hashes, lineage_check(r), committed_check(r, allow_uncommitted),
                       *quality_checks(r.metrics.evaluate, s.thresholds), deployment_check(r.metrics.evaluate),
                       kernels_check(r.metrics.export, r.params.evaluate.backend)))


# ---- names, card, tags -----------------------------------------------------------------------


def release_name(r: Result) -> str:
    """``pqd-<model>-w<W>a<A>``, e.g. pqd-demo-digits-w8a8 (w7a8 when the weights are stored as 7-bit codes)."""
    return f"pqd-{model_slug(r.params)}-{r.bits}"


# registry tags pqd.<metric>: the evaluation's numbers a version carries (the audit compares them with evaluate.json)
REGISTRY_METRICS = ("delta_fid", "noise_floor", "fid_quant_vs_fp", "delta_fid_ci.lo", "delta_fid_ci.hi",
                    "fid_quant_vs_fp_ci.lo", "fid_quant_vs_fp_ci.hi", "psnr_mean_ci.lo", "psnr_mean_ci.hi")


def version_tags(r: Result, report: GateReport, s: GateSettings) -> dict[str, str]:
    """Registry tags that make a version auditable on its own."""
    ev = r.metrics.evaluate
    keep = ("git.commit", "git.dirty", "pqd.model_sha256", "pqd.source_model", "pqd.protocol")
    tags = {k: v for k, v in lineage_tags(r).items() if k in keep or k.startswith("dvc.lock")}
    tags |= {f"pqd.{k}": str(ev.get(k) if ev is not None else None) for k in REGISTRY_METRICS}
    tags |= remote.release_tags(r.root, r.lock)  # where its data is, and the exact DVC hash of each output
    return {**tags, "pqd.gate": "passed" if report.passed else "failed",
            "pqd.uncommitted": str("committed" in report.waived).lower(),
            **{f"pqd.gate.{k}": f"{v:g}" for k, v in as_dict(s.thresholds).items()}}


# ---- operations ------------------------------------------------------------------------------


class GateFailed(PqdError):
    """The gate refused the result; nothing was registered. The message is one line."""


def check(root: str | Path = ".", settings: GateSettings | None = None,
          allow_uncommitted: bool = False) -> tuple[Result, GateReport]:
    """Read the result in ``root`` and run the gate (no MLflow access)."""
    r = read_result(root)
    return r, gate(r, settings or load_settings(r.root / "params.yaml"), allow_uncommitted)


def register_candidate(root: str | Path = ".", experiment: str = tracking.DEFAULT_EXPERIMENT,
                       settings: GateSettings | None = None,
                       allow_uncommitted: bool = False) -> tracking.RegisteredVersion:
    """Gate the result; when it passes, track it (idempotent) and register it with alias ``candidate``.
    ``allow_uncommitted`` registers a result whose dvc.lock is not the committed one (stated in tags and card)."""
    s = settings or load_settings(Path(root) / "params.yaml")
    r, report = check(root, s, allow_uncommitted)
    if not report.passed:
        raise GateFailed(report.summary())
    run = tracking.track(r.root, experiment)
    name, checks = release_name(r), [(c.name, c.verdict, c.detail) for c in report.checks]
    card = model_card(r, name, checks, s.source, bool(report.waived), run)
    return tracking.register_version(run, r.root, name, card, version_tags(r, report, s), alias=CANDIDATE)


def promote(root: str | Path, name: str, version: str | None = None) -> str:
    """Point ``production`` at ``version`` (default: the current candidate); returns the version."""
    info = tracking.version_info(root, name, alias=None if version else CANDIDATE, version=version)
    if info["tags"].get("pqd.gate") != "passed":
        raise GateFailed(f"{name} version {info['version']} has no passed release gate (tag pqd.gate = "
                         f"{info['tags'].get('pqd.gate')!r}): register it with `python -m pqd.ops.release register`")
    tracking.set_alias(root, name, PRODUCTION, info["version"])
    return info["version"]


@command("pqd release", tracking.ERRORS)
def main(argv: list[str] | None = None) -> int:
    """``python -m pqd.ops.release check | register | promote NAME [--version N]``."""
    ap = argparse.ArgumentParser(prog="python -m pqd.ops.release", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for cmd, text in (("check", "run the gate only"), ("register", "gate, then register as 'candidate'")):
        sp = sub.add_parser(cmd, help=text)
        sp.add_argument("--root", default=".")
        for key in GATE_KEYS:
            sp.add_argument(f"--{key.replace('_', '-')}", type=float, help=f"override release.{key}")
        sp.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT)
        sp.add_argument("--allow-uncommitted", action="store_true",
                        help="register even when dvc.lock is not the one committed at HEAD (tags and card say so)")
    sp = sub.add_parser("promote", help="move the 'production' alias to a registered version")
    sp.add_argument("name", nargs="?", help="registered model (default: the one params.yaml describes, "
                                             "e.g. pqd-demo-digits-w8a8)")
    sp.add_argument("--version", help="version number (default: the 'candidate' version)")
    sp.add_argument("--root", default=".")
    args = ap.parse_args(argv)
    tracking.quiet_mlflow()
    try:
        if args.command == "promote":
            name = args.name or release_name(read_result(args.root))
            v = promote(args.root, name, args.version)
            print(f"pqd release: {PRODUCTION} -> {name} version {v} (load models:/{name}@{PRODUCTION})")
            return 0
        s = load_settings(Path(args.root) / "params.yaml")
        overrides = {k: getattr(args, k) for k in GATE_KEYS if getattr(args, k) is not None}
        if overrides:
            s = settings_with(s, overrides)
        if args.command == "check":
            _, report = check(args.root, s, args.allow_uncommitted)
            for c in report.checks:
                print(f"  {c.name:<14} {c.verdict:<6}  {c.detail}")
            print(f"pqd release: {report.summary()}", file=sys.stdout if report.passed else sys.stderr)
            return 0 if report.passed else 1
        v = register_candidate(args.root, args.experiment, s, args.allow_uncommitted)
    except GateFailed as e:
        print(f"pqd release: {e}", file=sys.stderr)
        return 1
    state = "registered" if v.created else "already registered"
    print(f"pqd release: {state} {v.name} version {v.version} as '{v.alias}' (run {v.run_id}); "
          f"promote with: python -m pqd.ops.release promote {v.name} --version {v.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
