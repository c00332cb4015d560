"""The shape of the code base, checked from the source: layers import only downwards, no import cycle, no
function-level import of the product's own modules, no module over 400 lines, every stage's dvc.yaml deps
cover the code it imports (transitively), and params.yaml and docs/parameters.md show every parameter."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from pqd.params import Params, sections
from support.dvc_deps import MODULES, closure, imports, stage_code, stage_module

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(MODULES.values())
# layers from the bottom; a module may import its own layer's modules and any layer below
LAYERS = [("pqd.errors",), ("pqd.params",), ("pqd.core",), ("pqd.formats",), ("pqd.diffusion",), ("pqd.eval", "pqd.deploy"),
          ("pqd.stages",), ("pqd.ops",), ("pqd.bench",), ("pqd.api", "flows")]
RANK = {pkg: i for i, pkgs in enumerate(LAYERS) for pkg in pkgs}


def layer(module: str) -> str:
    return max((p for p in RANK if module == p or module.startswith(p + ".")), key=len)


def test_layers_import_only_downwards():
    bad = [f"{m} -> {x}" for m, f in MODULES.items() if m != "pqd" for x in imports(f)
           if x != "pqd" and (RANK[layer(x)] > RANK[layer(m)]
                              or (RANK[layer(x)] == RANK[layer(m)] and layer(x) != layer(m)))]
    assert bad == []


def test_no_import_cycle():
    graph = {m: {x for x in imports(f, top_level_only=True) if not x.startswith(m + ".")} for m, f in MODULES.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for x in sorted(graph[m]):
            if state.get(x) == 1:
                cycles.append(" -> ".join(path[path.index(x):] + [x]))
            elif x not in state:
                visit(x, path + [x])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_function_level_import_of_the_product():
    """An import inside a function hides a dependency (or dodges a cycle): the product imports at the top."""
    hidden = {m: sorted(imports(f) - imports(f, top_level_only=True)) for m, f in MODULES.items()}
    assert {m: h for m, h in hidden.items() if h} == {}


def test_no_module_over_400_lines():
    long = {str(f.relative_to(ROOT)): n for f in FILES if (n := len(f.read_text().splitlines())) > 400}
    assert long == {}


def test_the_quantization_core_is_pure_torch():
    """pqd/core imports no other layer of the product and no edge library."""
    for f in (ROOT / "pqd/core").glob("*.py"):
        assert {layer(x) for x in imports(f)} <= {"pqd.core", "pqd.errors"}, f.name
        assert not re.search(r"^\s*(import|from) (diffusers|mlflow|prefect|dvc|onnx)\b", f.read_text(), re.M), f.name


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_deps_cover_the_code_it_runs(stage):
    """A stage's deps list exactly the project code it imports, transitively (python tests/support/dvc_deps.py
    writes them)."""
    spec = STAGES[stage]
    deps = [ROOT / d for d in spec["deps"]]
    needed = set(stage_code(spec))
    assert stage_module(spec).startswith("pqd.stages.")
    uncovered = sorted(n for n in needed if not any(ROOT / n == d or d in (ROOT / n).parents for d in deps))
    assert uncovered == [], f"dvc.yaml stage {stage} imports code its deps do not list"
    listed_code = {str(d.relative_to(ROOT)) for d in deps if d.suffix == ".py"}
    assert listed_code <= needed, f"dvc.yaml stage {stage} lists code it does not import: {sorted(listed_code - needed)}"


def test_the_model_and_generate_stages_do_not_depend_on_the_quantizer():
    """Changing how layers are quantized must not re-run demo training or FP sampling (hours on a real model)."""
    for stage in ("model", "generate"):
        touched = closure(f"pqd.stages.{stage}")
        assert not touched & {"pqd.core.quantize", "pqd.core.modules", "pqd.core.reconstruct", "pqd.core.affine"}, stage


def _fields(cls: type, prefix: str = "") -> dict[str, object]:
    """Every parameter of ``cls`` by dotted key, with its default."""
    out: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[prefix + f.name] = list(default) if isinstance(default, tuple) else default
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def test_params_yaml_shows_every_parameter_with_its_default_and_a_comment():
    """Every field of pqd/params/sections.py is written in params.yaml (so DVC tracks it), with the code's default
    (null where the method preset fills it in) and a comment; no key in params.yaml is unknown to the code."""
    fields = _fields(Params)
    text = (ROOT / "params.yaml").read_text()
    written = _flatten(yaml.safe_load(text))
    assert sorted(set(fields) - set(written)) == [], "params the code reads but params.yaml does not show"
    assert sorted(set(written) - set(fields)) == []
    assert {k: v for k, v in written.items() if v != fields[k]} == {}, "params.yaml values differ from the defaults"
    for key in fields:
        leaf = key.rsplit(".", 1)[-1]
        line = next(ln for ln in text.splitlines() if re.match(rf"\s*{re.escape(leaf)}:", ln))
        assert "#" in line, f"params.yaml: {key} has no comment"


def test_docs_parameters_page_lists_every_parameter_with_its_default():
    fields = _fields(Params)
    rows = dict(re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", (ROOT / "docs/parameters.md").read_text(), re.M))
    assert sorted(set(fields) - set(rows)) == [] and sorted(set(rows) - set(fields)) == []
    assert {k: v for k, v in rows.items() if yaml.safe_load(v) != fields[k]} == {}


def test_sections_module_is_the_schema():
    """Every section of Params is defined in pqd/params/sections.py (one place for every default)."""
    hints = typing.get_type_hints(Params)
    assert all(getattr(sections, hints[f.name].__name__, None) is hints[f.name]
               for f in dataclasses.fields(Params) if dataclasses.is_dataclass(hints[f.name]))
