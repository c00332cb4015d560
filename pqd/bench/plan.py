"""The plan of ``make bench``: named rows x models x replicates -> cells, each a DVC experiment of this project
(a name and ``-S key=value`` overrides of params.yaml), run by the sweep's runner (:mod:`flows.bench`).

A **row** is a named calibration setting: its weight bits and the keys it sets over the method preset (every method
key is reset to null first, so the row's ``calibrate.method`` preset fills in what the row does not set). Rows are
named ``w<bits>-<label>`` (``w4-pqd-uniform-steps``); row sets are lists of names.

A **replicate** k varies what a user does not control: the model itself where the benchmark trains it (the demos:
``model.seed`` + k), the calibration trajectories' seeds (``generate.calib_seed_base`` + k x 10^6), the selection
seed (``select.seed`` + k) and the reconstruction seed (``calibrate.seed`` + k); replicate 0 is params.yaml itself.
The evaluation seeds stay the same, so every row of a replicate is compared image by image with the same FP samples.
Every row of a replicate has the same model and generate params, so DVC runs those stages once per replicate and
restores them from its run cache for the other rows.

**Models**: ``model.source`` values; the demos get their bench settings (DEMO_BENCH), any other source is
params.yaml with that source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqd.errors import ParamError
from pqd.params import apply_overrides, params_from_dict
from pqd.params.methods import METHOD_KEYS, METHODS
from pqd.params.sections import GLUE_KINDS

Settings = dict[str, dict[str, Any]]  # {section: {key: value}}


@dataclass(frozen=True)
class Row:
    label: str  # what the tables show, e.g. "pqd, uniform steps"
    bits: int  # quant.weight_bits
    settings: Settings = field(default_factory=dict)  # over the method preset
    against: str | None = None  # the row it is compared with when both run (None: w<bits>-pqd)

    @property
    def name(self) -> str:
        """w<bits>-<label as a slug>, e.g. w4-pqd-uniform-steps."""
        return f"w{self.bits}-" + slug(self.label)


def slug(text: str) -> str:
    return "-".join(filter(None, re.split(r"[^a-z0-9]+", text.lower())))


SHARED = ", shared grids"  # the suffix of a row with quant.share_grids (compared with the row without it)
FAST = "pqd, no shortcut split, all glue, attention matmuls, shared grids, symmetric activation grids"
PREVIOUS = "pqd, previous defaults"
PREVIOUS_ROW = "w8-" + slug(PREVIOUS)  # the row of the previous defaults, which the graph rows are compared with
_PQD = {"calibrate": {"method": "pqd"}}
# the integer graph of the defaults before every fast setting became one (issue 22): skip concatenations split, no
# glue, attention's matmuls in float, a grid per layer, grids with offsets. The rows that switch one of these on
# are built over it, as they were measured, and compared with it
_PREVIOUS_GRAPH: Settings = {"calibrate": {"split_shortcut": True},
                             "quant": {"glue": [], "attention": False, "softmax_bits": 16, "share_grids": False,
                                       "act_symmetric": False}}


def _over_previous(settings: Settings) -> Settings:
    """``settings`` over the previous defaults' graph (a key ``settings`` sets wins)."""
    return {s: {**_PREVIOUS_GRAPH.get(s, {}), **settings.get(s, {})} for s in {*_PREVIOUS_GRAPH, *settings}}


def _graph_row(label: str, settings: Settings) -> Row:
    """A W8 row that switches graph settings on over the previous defaults, compared with that row."""
    return Row(label, 8, _over_previous(settings), against=PREVIOUS_ROW)


W4_BUDGET = 4.5  # average weight bits (scales included) of the mixed-precision rows: 7.1x smaller than float32
_ALL_GLUE = list(GLUE_KINDS)
_ALL_GLUE_ATTENTION = {"calibrate": {"method": "pqd", "split_shortcut": False},
                       "quant": {"glue": _ALL_GLUE, "attention": True, "softmax_bits": 8}}
_ROWS = [
    *[Row(m, bits, {"calibrate": {"method": m}}) for bits in (8, 4) for m in METHODS],
    Row("pqd, uniform steps", 4, {**_PQD, "select": {"timesteps": "uniform"}}),
    Row("pqd, random selection", 4, {**_PQD, "select": {"rule": "random"}}),
    Row("pqd, G=1", 4, {"calibrate": {"method": "pqd", "time_groups": 1}}),
    Row("pqd, QDrop p=0", 4, {"calibrate": {"method": "pqd", "qdrop_p": 0.0}}),
    Row(PREVIOUS, 8, _over_previous(_PQD)),
    # quantized attention matmuls (quant.attention), softmax output on 16 and on 8 bits
    _graph_row("pqd, attention matmuls, softmax 16-bit", {**_PQD, "quant": {"attention": True}}),
    _graph_row("pqd, attention matmuls, softmax 8-bit", {**_PQD, "quant": {"attention": True, "softmax_bits": 8}}),
    # integer codes of 8-bit weights (quant.reduce_range): 7-bit codes against full 8-bit codes, on this CPU
    Row("pqd, 7-bit weight codes", 8, {**_PQD, "quant": {"reduce_range": True}}),
    Row("pqd, full 8-bit weight codes", 8, {**_PQD, "quant": {"reduce_range": False}}),
    # channel balancing (quant.smooth, SmoothQuant) against w8-pqd and w8-pqd-g-1; time groups off at W8
    Row("pqd, quant.smooth", 8, {**_PQD, "quant": {"smooth": True}}),
    Row("pqd, quant.smooth", 4, {**_PQD, "quant": {"smooth": True}}),
    Row("pqd, G=1", 8, {"calibrate": {"method": "pqd", "time_groups": 1}}),
    # glue between integer kernels (quant.glue): each kind alone, then together; a concatenation is one tensor on
    # one grid, so its rows turn the shortcut split off
    *[_graph_row(f"pqd, glue {k}", {**_PQD, "quant": {"glue": [k]}}) for k in ("residual", "temb", "silu", "attention")],
    _graph_row("pqd, glue residual+temb+silu+attention",
               {**_PQD, "quant": {"glue": ["residual", "temb", "silu", "attention"]}}),
    _graph_row("pqd, no shortcut split", {"calibrate": {"method": "pqd", "split_shortcut": False}}),
    _graph_row("pqd, no shortcut split, glue concat",
               {"calibrate": {"method": "pqd", "split_shortcut": False}, "quant": {"glue": ["concat"]}}),
    _graph_row("pqd, no shortcut split, all glue",
               {"calibrate": {"method": "pqd", "split_shortcut": False}, "quant": {"glue": _ALL_GLUE}}),
    # one grid per tensor (quant.share_grids) on the deployment benchmark's fastest graphs: the most glue with
    # attention's matmuls on 8 bits, without and with it (UNets); attention's matmuls with it (transformers)
    _graph_row("pqd, no shortcut split, all glue, attention matmuls", _ALL_GLUE_ATTENTION),
    _graph_row("pqd, no shortcut split, all glue, attention matmuls" + SHARED,
               {**_ALL_GLUE_ATTENTION, "quant": {**_ALL_GLUE_ATTENTION["quant"], "share_grids": True}}),
    _graph_row("pqd, attention matmuls, softmax 8-bit" + SHARED,
               {**_PQD, "quant": {"attention": True, "softmax_bits": 8, "share_grids": True}}),
    # activation grids without an offset (quant.act_symmetric): what the zero points cost
    _graph_row("pqd, symmetric activation grids", {**_PQD, "quant": {"act_symmetric": True}}),
    # the fastest integer graph of make bench-deploy, every fast setting at once: the defaults since issue 22 (w8-pqd)
    _graph_row(FAST, {**_ALL_GLUE_ATTENTION, "quant": {**_ALL_GLUE_ATTENTION["quant"], "share_grids": True,
                                                       "act_symmetric": True}}),
    # error-compensating rounding (calibrate.rounding: gptq) before reconstruction, against w4-pqd / w8-pqd
    *[Row("pqd, gptq rounding", bits, {"calibrate": {"method": "pqd", "rounding": "gptq"}}) for bits in (4, 8)],
    # 4-bit weight tools (quant.weight_group_size, quant.weight_bits_budget), each against w4-pqd; the budget counts
    # scales, so groups of 32 (one float32 scale per 32 x kernel weights) leave less of it for 8-bit layers
    Row("pqd, groups of 32", 4, {**_PQD, "quant": {"weight_group_size": 32}}),
    Row(f"pqd, mixed {W4_BUDGET} bits", 4, {**_PQD, "quant": {"weight_bits_budget": W4_BUDGET}}),
    # edge and modulation layers as mixed-precision candidates too (at 4 bits unless the solver moves them): on the
    # DiT demo they hold so many weights that with them fixed at 8 bits no layer choice reaches the budget
    Row(f"pqd, mixed {W4_BUDGET} bits, edge and modulation layers included", 4,
        {**_PQD, "quant": {"weight_bits_budget": W4_BUDGET, "edge_bits": 4, "modulation_bits": 4}}),
    Row(f"pqd, groups of 32, mixed {W4_BUDGET} bits", 4,
        {**_PQD, "quant": {"weight_group_size": 32, "weight_bits_budget": W4_BUDGET}}),
    Row(f"pqd, gptq rounding, mixed {W4_BUDGET} bits", 4,
        {"calibrate": {"method": "pqd", "rounding": "gptq"}, "quant": {"weight_bits_budget": W4_BUDGET}}),
    # GPTQ with the edge and modulation layers at 4 bits: a modulation linear's input is the conditioning embedding,
    # which takes one value per (time step, class), so its Hessian has low rank and GPTQ can push rounding error into
    # directions the calibration inputs never reach; with and without the budget's 8-bit layers
    Row(f"pqd, gptq rounding, mixed {W4_BUDGET} bits, edge and modulation layers included", 4,
        {"calibrate": {"method": "pqd", "rounding": "gptq"},
         "quant": {"weight_bits_budget": W4_BUDGET, "edge_bits": 4, "modulation_bits": 4}}),
    Row("pqd, gptq rounding, edge and modulation layers at 4 bits", 4,
        {"calibrate": {"method": "pqd", "rounding": "gptq"}, "quant": {"edge_bits": 4, "modulation_bits": 4}}),
    # rotations folded into attention's value and output projections (quant.rotate), against w4-pqd
    Row("pqd, hadamard rotation", 4, {**_PQD, "quant": {"rotate": "hadamard"}}),
    Row(f"pqd, hadamard rotation, mixed {W4_BUDGET} bits", 4,
        {**_PQD, "quant": {"rotate": "hadamard", "weight_bits_budget": W4_BUDGET}}),
    # W4A4 (simulated: integer kernels take 8-bit activations, so no ONNX graphs and a torch evaluation)
    *[Row("pqd, 4-bit activations, groups of 32" + rot, 4,
          {**_PQD, "quant": {"act_bits": 4, "weight_group_size": 32, **({"rotate": "hadamard"} if rot else {})},
           "export": {"onnx": False}, "evaluate": {"backend": "torch"}}) for rot in ("", ", hadamard rotation")],
]
ROWS: dict[str, Row] = {r.name: r for r in _ROWS}
assert len(ROWS) == len(_ROWS), "two rows with one name"
# the methods at W8A8 and W4A8 and the four ablations
DEFAULT_ROWS = [*(f"w{b}-{m}" for b in (8, 4) for m in METHODS), "w4-pqd-uniform-steps", "w4-pqd-random-selection",
                "w4-pqd-g-1", "w4-pqd-qdrop-p-0"]
# named row sets (``--rows transformer``): the transformer demo's table; PQD W8A8 against each kind of quantized
# glue and the shortcut split; one grid per tensor against the same quantization without it (UNet, transformer)
ROW_SETS: dict[str, list[str]] = {
    "default": DEFAULT_ROWS,
    "transformer": ["w8-minmax", "w8-qdiffusion", "w8-pqd", "w4-minmax", "w4-qdiffusion", "w4-pqd", "w8-pqd-g-1",
                    "w4-pqd-g-1", "w8-pqd-quant-smooth", "w4-pqd-quant-smooth"],
    "glue": [PREVIOUS_ROW, *(r.name for r in _ROWS if r.label.startswith(("pqd, glue", "pqd, no shortcut split"))
                         and "attention matmuls" not in r.label)],
    "w4": ["w8-pqd", "w4-pqd", *(r.name for r in _ROWS if r.bits == 4 and "activations" not in r.label
                                 and any(k in r.label for k in ("gptq", "groups", "mixed", "rotation")))],
    "shared": [PREVIOUS_ROW, "w8-pqd-no-shortcut-split-all-glue-attention-matmuls",
               "w8-pqd-no-shortcut-split-all-glue-attention-matmuls-shared-grids",
               "w8-pqd-attention-matmuls-softmax-8-bit", "w8-pqd-attention-matmuls-softmax-8-bit-shared-grids"],
    "symmetric": [PREVIOUS_ROW, "w8-pqd-symmetric-activation-grids"],
    # the defaults against the previous ones (data/bench/fast measured w8-<FAST> against them, then named w8-pqd)
    "fast": [PREVIOUS_ROW, "w8-pqd"],
}
DEFAULT_MODELS = ("demo:digits", "demo:digits16")
# bench settings of the demos, over params.yaml. demo:digits16: a two-level UNet trained in minutes here, measured
# against its own 16x16 RGB digits, sampled with 25 DDIM steps; its rows measure the simulated quantized model
# (evaluate.backend torch, no ONNX graphs), since its deployed graphs cost twice the sampling time on this CPU and
# agree with the simulation (tests/e2e/test_second_model.py)
DEMO_BENCH: dict[str, Settings] = {
    "demo:digits16": {"model": {"channels": [32, 64], "train_steps": 400, "batch_size": 64},
                      "generate": {"steps": 25}, "export": {"onnx": False},
                      "evaluate": {"reference": "demo:digits16", "backend": "torch"}},
}
REPLICATE_SEED_STRIDE = 1_000_000  # replicate k's calibration trajectories start k x this after generate.calib_seed_base


@dataclass(frozen=True)
class BenchCell:
    """One cell: the DVC experiment ``name`` (<model>-r<k>-<row>) and its overrides of params.yaml, in order."""

    name: str
    model: str  # model_key of the source
    replicate: int
    row: str  # a name of ROWS
    overrides: tuple[str, ...]
    shared: tuple[str, ...]  # the overrides of the model and generate stages (the same for every row of a replicate)


def model_key(source: str) -> str:
    """Short name of a model: demo:digits16 -> digits16, ./models/my-pipe -> my-pipe."""
    name = source.split(":", 1)[1] if source.startswith("demo:") else Path(source.rstrip("/")).name
    return slug(name) or "model"


def row_names(spec: str) -> list[str]:
    """``--rows``: a row set's name or comma-separated row names (empty: the default set); a ParamError names an
    unknown one."""
    names = ROW_SETS.get(spec) or [s.strip() for s in spec.split(",") if s.strip()] or DEFAULT_ROWS
    bad = [n for n in names if n not in ROWS]
    if bad:
        raise ParamError(f"bench: --rows {bad[0]!r} is not allowed: expected a row set ({', '.join(ROW_SETS)}) or "
                         f"row names such as {', '.join(list(ROWS)[:3])} (python -m flows.bench --list-rows)")
    return names


def _value(v: Any) -> str:
    """A value as ``dvc exp run -S`` and pqd.params.apply_overrides both read it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def _items(settings: Settings) -> dict[str, str]:
    return {f"{s}.{k}": _value(v) for s, values in settings.items() for k, v in values.items()}


def plan(base: dict[str, Any], models: list[str], rows: list[str], replicates: int,
         sets: list[str] | None = None) -> list[BenchCell]:
    """The cells of ``models`` x ``rows`` x ``replicates`` over params.yaml's content ``base`` and the shared ``sets``
    (``key=value``), replicate by replicate (an interrupted bench leaves whole replicates)."""
    if replicates < 1:
        raise ParamError(f"bench: --replicates {replicates} is not allowed: expected an integer >= 1")
    apply_overrides(base, list(sets or []))  # a malformed one is a ParamError
    cells = []
    for k in range(replicates):
        for source in models:
            shared = {"model.source": source, **_items(DEMO_BENCH.get(source, {}))}
            shared |= dict(s.split("=", 1) for s in sets or [])
            p = params_from_dict(apply_overrides(base, [f"{a}={b}" for a, b in shared.items()]))
            shared |= {"model.seed": str(p.model.seed + k),
                       "generate.calib_seed_base": str(p.generate.calib_seed_base + k * REPLICATE_SEED_STRIDE),
                       "select.seed": str(p.select.seed + k), "calibrate.seed": str(p.calibrate.seed + k)}
            for name in rows:
                row = ROWS[name]
                items = {**shared, **{key: "null" for key in METHOD_KEYS}, "quant.weight_bits": str(row.bits),
                         **_items(row.settings)}
                cells.append(BenchCell(f"{model_key(source)}-r{k}-{name}", model_key(source), k, name,
                                       tuple(f"{a}={b}" for a, b in items.items()),
                                       tuple(f"{a}={b}" for a, b in shared.items())))
    return cells


def comparison_pairs(rows: list[str]) -> list[tuple[str, str]]:
    """(first, second) row names compared: PQD against each preset at the same bits, every 'pqd, ...' variant
    against the row it names (else PQD at its bits), and a row with shared grids against the same row without."""
    pairs = [(f"w{b}-pqd", f"w{b}-{m}") for b in (8, 4) for m in METHODS if m != "pqd"]
    pairs += [(n, ROWS[n].against or f"w{ROWS[n].bits}-pqd") for n in rows if ROWS[n].label.startswith("pqd, ")]
    pairs += [(n, Row(ROWS[n].label.removesuffix(SHARED), ROWS[n].bits).name) for n in rows
              if ROWS[n].label.endswith(SHARED)]
    return [(a, b) for a, b in pairs if a in rows and b in rows]
