"""Releases: the quality gate, the model card, the released sampler and ``python -m pqd.release``.

A release is the current pipeline result, gated and registered in the MLflow Model Registry as a
version of ``pqd-<model>-w<W>a<A>`` with the alias ``candidate``. The gate passes when

* ``hashes``: every file of the export matches manifest.json;
* ``lineage``: dvc.lock says the evaluation ran on this export and recorded this evaluate.json;
* ``max_fid_delta``: ΔFID (quantized minus FP, both against the reference) <= ``release.max_fid_delta``;
* ``noise_floor``: ΔFID <= ``release.floor_multiple`` x the noise floor (FID between two disjoint FP sets).

A failed gate registers nothing and names the failed checks in one line. Moving ``production`` is a
separate, explicit command (``promote``). Registry operations go through :mod:`pqd.tracking`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pqd import tracking
from pqd.params import ParamError, load_params, params_from_dict

CANDIDATE, PRODUCTION = "candidate", "production"


# ----------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class ReleaseSettings:
    """The gate's thresholds (``release.*`` in params.yaml)."""

    max_fid_delta: float = 2.0  # largest ΔFID a release may have
    floor_multiple: float = 3.0  # ΔFID must also stay within this multiple of the noise floor
    source: str = "defaults"  # where the values came from (recorded in the card)


def validated_settings(values: dict[str, Any], source: str) -> ReleaseSettings:
    """ReleaseSettings from ``{key: value}``, checked by the same rules as ``release.*`` in params.yaml
    (one-line ParamError for an unknown key or a bad value)."""
    rp = params_from_dict({"release": values}).release
    return ReleaseSettings(max_fid_delta=rp.max_fid_delta, floor_multiple=rp.floor_multiple, source=source)


def load_release_params(params_file: str | Path = "params.yaml") -> ReleaseSettings:
    """``release.*`` from params.yaml (validated with every other key by pqd.params)."""
    rp = load_params(params_file).release
    data = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    source = "params.yaml" if isinstance(data, dict) and data.get("release") else "defaults"
    return ReleaseSettings(max_fid_delta=rp.max_fid_delta, floor_multiple=rp.floor_multiple, source=source)


# ----------------------------------------------------------------------------------------------
# the gate


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateReport:
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def summary(self) -> str:
        """One line: 'passed' or the failed checks with their reasons."""
        if self.passed:
            return "release gate passed: " + ", ".join(c.name for c in self.checks)
        return "release gate failed: " + "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.passed)


def fid_checks(evaluate: dict[str, Any], s: ReleaseSettings) -> list[Check]:
    """The two FID checks on evaluate.json's ``delta_fid`` and ``noise_floor``."""
    delta, floor = evaluate.get("delta_fid"), evaluate.get("noise_floor")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (delta, floor)):
        bad = f"delta_fid = {delta!r}, noise_floor = {floor!r}"
        return [Check("max_fid_delta", False, f"evaluate.json has no finite {bad}"),
                Check("noise_floor", False, f"evaluate.json has no finite {bad}")]
    limit = s.floor_multiple * floor
    return [
        Check("max_fid_delta", delta <= s.max_fid_delta,
              f"delta FID {delta:.4g} {'<=' if delta <= s.max_fid_delta else '>'} "
              f"release.max_fid_delta {s.max_fid_delta:g}"),
        Check("noise_floor", delta <= limit,
              f"delta FID {delta:.4g} {'<=' if delta <= limit else '>'} release.floor_multiple {s.floor_multiple:g} "
              f"x noise floor {floor:.4g} = {limit:.4g}"),
    ]


def md5_file(path: Path) -> str:
    """md5 of a file's bytes, as DVC records it in dvc.lock."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def lock_hash(entries: list[dict[str, Any]] | None, path: str) -> str | None:
    """The md5 a dvc.lock ``deps``/``outs`` list records for ``path`` (None when absent)."""
    for e in entries or []:
        if e.get("path") == path:
            return e.get("md5")
    return None


def lock_lineage(lock: dict[str, Any], options: dict[str, dict[str, str]], metrics_file: Path) -> Check:
    """dvc.lock ties the metrics to the export: evaluate consumed the export's recorded hash, and
    ``metrics_file`` (evaluate.json) is the one dvc recorded."""
    stages = lock.get("stages") or {}
    export_path, metrics_path = options["export"]["out"], options["evaluate"]["metrics"]
    made = lock_hash(stages.get("export", {}).get("outs"), export_path)
    used = lock_hash(stages.get("evaluate", {}).get("deps"), export_path)
    if made is None or made != used:
        return Check("lineage", False, f"dvc.lock: evaluate used {export_path} {used} but export made {made}: "
                                       "run dvc repro")
    recorded = lock_hash(stages.get("evaluate", {}).get("outs"), metrics_path)
    if not metrics_file.is_file() or md5_file(metrics_file) != recorded:
        return Check("lineage", False, f"{metrics_path} differs from the hash in dvc.lock: run dvc repro")
    return Check("lineage", True, f"evaluate ran on export {made}")


def lineage_check(r: tracking.Result) -> Check:
    """:func:`lock_lineage` for the result in the work tree."""
    if r.lock is None:
        return Check("lineage", False, "dvc.lock is missing: run the pipeline with dvc repro (make run)")
    return lock_lineage(r.lock, r.options, r.root / r.options["evaluate"]["metrics"])


def gate(r: tracking.Result, s: ReleaseSettings) -> GateReport:
    """All checks (none stops the others, so the report names every failure)."""
    from pqd.artifact import ArtifactError, verify_manifest

    try:
        files = verify_manifest(r.export_dir).get("files", {})
        hashes = Check("hashes", True, f"{len(files)} files match manifest.json")
    except (ArtifactError, FileNotFoundError, ValueError) as e:
        hashes = Check("hashes", False, str(e).splitlines()[0])
    return GateReport((hashes, lineage_check(r), *fid_checks(r.metrics.get("evaluate", {}), s)))


# ----------------------------------------------------------------------------------------------
# names, card, tags


def release_name(params: dict[str, Any]) -> str:
    """``pqd-<model>-w<W>a<A>``, e.g. pqd-demo-digits-w8a8."""
    return f"pqd-{tracking.model_slug(params)}-{tracking.bits_label(params)}"


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(v: Any) -> str:
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def model_card(r: tracking.Result, report: GateReport, s: ReleaseSettings, run: tracking.TrackedRun) -> str:
    """Markdown: method, metrics, gate, evaluation protocol, lineage, parameters, how to load."""
    p, ev, ex = r.params, r.metrics.get("evaluate", {}), r.metrics.get("export", {})
    name, tags = release_name(p), tracking.lineage_tags(r)
    q = p.get("quant", {})
    method = [("bits", f"weights {q.get('weight_bits')}-bit per output channel (symmetric), activations "
                       f"{q.get('act_bits')}-bit per tensor (asymmetric), edge layers {q.get('edge_bits')}-bit"),
               ("attention matmuls", f"Q·Kᵀ and softmax·V quantized, softmax output {q.get('softmax_bits')}-bit"
                if q.get("attention") else "Q·Kᵀ and softmax·V in float (projections quantized)")]
    method += [(f"{sec}.{k}", v) for sec in ("select", "calibrate") for k, v in p.get(sec, {}).items()]
    metric_keys = ("delta_fid", "fid_quant_vs_ref", "fid_fp_vs_ref", "fid_quant_vs_fp", "noise_floor", "psnr_mean")
    metrics = [(f"evaluate.{k}", _num(ev.get(k))) for k in metric_keys if k in ev]
    metrics += [(f"export.{k}", _num(ex.get(k))) for k in ("size_ratio", "export_unet_bytes", "fp32_unet_bytes") if k in ex]
    lineage = [("git commit", f"{tags['git.commit']} (dirty: {tags['git.dirty']})"), ("MLflow run", run.run_id),
               ("result fingerprint", run.fingerprint), ("source model", tags["pqd.source_model"]),
               ("source model sha256", tags["pqd.model_sha256"])]
    lineage += [(k, v) for k, v in sorted(tags.items()) if k.startswith("dvc.lock")]
    params = sorted(tracking.flat_params(r).items())
    return "\n\n".join([
        f"# {name}",
        f"PQD post-training quantization of `{p['model']['source']}` at {tracking.bits_label(p).upper()}: integer "
        "weights and time-aware activation quantizers calibrated on samples from the model's own denoising "
        "trajectories. The artifact is the export folder (`export/`, hashes in `manifest.json`).",
        "## Method\n\n" + _table(method, ("setting", "value")),
        "## Metrics\n\n" + _table(metrics, ("metric", "value")),
        f"## Quality gate (thresholds from {s.source})\n\n"
        + _table([(c.name, "pass" if c.passed else "FAIL", c.detail) for c in report.checks], ("check", "result", "detail")),
        "## Evaluation protocol\n\n" + _table(sorted((ev.get("protocol") or {}).items()), ("key", "value")),
        "## Lineage\n\n" + _table(lineage, ("what", "value")),
        "## Load\n\n```python\nfrom pqd.tracking import load_sampler\n"
        f'sampler = load_sampler("models:/{name}@{PRODUCTION}")\nimages = sampler.sample([0, 1, 2, 3])  '
        "# float32 [4, C, H, W] in [0, 1]\n```",
        "## Parameters\n\n" + _table(params, ("key", "value")),
    ]) + "\n"


def version_tags(r: tracking.Result, report: GateReport, s: ReleaseSettings) -> dict[str, str]:
    """Registry tags that make a version auditable on its own."""
    ev = r.metrics.get("evaluate", {})
    keep = ("git.commit", "git.dirty", "pqd.model_sha256", "pqd.source_model", "pqd.protocol")
    tags = {k: v for k, v in tracking.lineage_tags(r).items() if k in keep or k.startswith("dvc.lock")}
    return {**tags, "pqd.delta_fid": str(ev.get("delta_fid")), "pqd.noise_floor": str(ev.get("noise_floor")),
            "pqd.fid_quant_vs_fp": str(ev.get("fid_quant_vs_fp")), "pqd.gate": "passed" if report.passed else "failed",
            "pqd.gate.max_fid_delta": f"{s.max_fid_delta:g}", "pqd.gate.floor_multiple": f"{s.floor_multiple:g}"}


# ----------------------------------------------------------------------------------------------
# operations


class GateFailed(RuntimeError):
    """The gate refused the result; nothing was registered. The message is one line."""


def check(root: str | Path = ".", settings: ReleaseSettings | None = None) -> tuple[tracking.Result, GateReport]:
    """Read the result in ``root`` and run the gate (no MLflow access)."""
    r = tracking.read_result(root)
    return r, gate(r, settings or load_release_params(r.root / "params.yaml"))


def register_candidate(root: str | Path = ".", experiment: str = tracking.DEFAULT_EXPERIMENT,
                       settings: ReleaseSettings | None = None) -> tracking.RegisteredVersion:
    """Gate the result; when it passes, track it (idempotent) and register it with alias ``candidate``."""
    s = settings or load_release_params(Path(root) / "params.yaml")
    r, report = check(root, s)
    if not report.passed:
        raise GateFailed(report.summary())
    run = tracking.track(r.root, experiment)
    return tracking.register_version(run, r.root, release_name(r.params), model_card(r, report, s, run),
                                     version_tags(r, report, s), alias=CANDIDATE)


def promote(root: str | Path, name: str, version: str | None = None) -> str:
    """Point ``production`` at ``version`` (default: the current candidate); returns the version."""
    info = tracking.version_info(root, name, alias=None if version else CANDIDATE, version=version)
    if info["tags"].get("pqd.gate") != "passed":
        raise GateFailed(f"{name} version {info['version']} has no passed release gate (tag pqd.gate = "
                         f"{info['tags'].get('pqd.gate')!r}): register it with `python -m pqd.release register`")
    tracking.set_alias(root, name, PRODUCTION, info["version"])
    return info["version"]


@dataclass
class Sampler:
    """A released quantized model ready to sample: the export's UNet + the evaluation's scheduler."""

    denoiser: Any  # pqd.diffusion.adapter.Denoiser around the quantized UNet
    protocol: dict[str, Any]  # scheduler class and config, steps, eta (the FP samples' meta.json)
    device: str = "cpu"

    @classmethod
    def from_folder(cls, export_dir: Path, protocol_file: Path, device: str = "cpu") -> "Sampler":
        """Rebuild from an export folder (hashes verified) and the sampling protocol file. It samples with
        what ships: the ONNX graphs in onnxruntime when the export has them, else the torch model."""
        from pqd import deploy
        from pqd.artifact import load_denoiser_from_export

        den = load_denoiser_from_export(export_dir, device)  # verifies every file, the ONNX graphs included
        if (Path(export_dir) / deploy.ONNX_DIR / deploy.graph_file(0)).is_file():
            den = deploy.load_ort_denoiser(export_dir)
        return cls(den, json.loads(Path(protocol_file).read_text()), device)

    def sample(self, seeds: list[int], steps: int | None = None, batch_size: int = 64) -> Any:
        """One image per seed, float32 [N, C, H, W] in [0, 1]; same seeds give the evaluation's images."""
        from pqd.diffusion.sampling import sample, scheduler_from_protocol

        n = int(steps or self.protocol["steps"])
        if n < 1:
            raise ValueError(f"steps = {steps!r} is not allowed: expected an integer >= 1")
        return sample(self.denoiser, scheduler_from_protocol(self.protocol), [int(s) for s in seeds], steps=n,
                      eta=float(self.protocol.get("eta", 0.0)), batch_size=batch_size, device=self.device,
                      progress=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m pqd.release check | register | promote NAME [--version N]``."""
    ap = argparse.ArgumentParser(prog="python -m pqd.release", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for cmd, text in (("check", "run the gate only"), ("register", "gate, then register as 'candidate'")):
        sp = sub.add_parser(cmd, help=text)
        sp.add_argument("--root", default=".")
        sp.add_argument("--max-fid-delta", type=float, help="override release.max_fid_delta")
        sp.add_argument("--floor-multiple", type=float, help="override release.floor_multiple")
        sp.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT)
    sp = sub.add_parser("promote", help="move the 'production' alias to a registered version")
    sp.add_argument("name", nargs="?", help="registered model (default: the one params.yaml describes, "
                                             "e.g. pqd-demo-digits-w8a8)")
    sp.add_argument("--version", help="version number (default: the 'candidate' version)")
    sp.add_argument("--root", default=".")
    args = ap.parse_args(argv)
    tracking.quiet_mlflow()
    try:
        if args.command == "promote":
            name = args.name or release_name(tracking.pipeline_params(Path(args.root) / "params.yaml"))
            v = promote(args.root, name, args.version)
            print(f"pqd release: {PRODUCTION} -> {name} version {v} (load models:/{name}@{PRODUCTION})")
            return 0
        s = load_release_params(Path(args.root) / "params.yaml")
        overrides = {k: v for k, v in (("max_fid_delta", args.max_fid_delta), ("floor_multiple", args.floor_multiple))
                     if v is not None}
        if overrides:
            s = validated_settings({"max_fid_delta": s.max_fid_delta, "floor_multiple": s.floor_multiple, **overrides},
                                   f"{s.source} + command line {overrides}")
        if args.command == "check":
            _, report = check(args.root, s)
            for c in report.checks:
                print(f"  {c.name:<14} {'pass' if c.passed else 'FAIL'}  {c.detail}")
            print(f"pqd release: {report.summary()}", file=sys.stdout if report.passed else sys.stderr)
            return 0 if report.passed else 1
        v = register_candidate(args.root, args.experiment, s)
    except GateFailed as e:
        print(f"pqd release: {e}", file=sys.stderr)
        return 1
    except (*tracking.ERRORS, ParamError, FileNotFoundError, ValueError) as e:
        print(f"pqd release: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    state = "registered" if v.created else "already registered"
    print(f"pqd release: {state} {v.name} version {v.version} as '{v.alias}' (run {v.run_id}); "
          f"promote with: python -m pqd.release promote {v.name} --version {v.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
