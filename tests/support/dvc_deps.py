"""The project code each dvc.yaml stage runs: its module's transitive import closure, read from the source.

``python tests/support/dvc_deps.py`` rewrites the ``pqd/`` entries of every stage's ``deps`` in dvc.yaml to
exactly that closure (the stage module first, then sorted; data deps kept); tests/test_layout.py checks it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def module_name(f: Path) -> str:
    parts = f.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(f): f for d in ("pqd", "flows") for f in sorted((ROOT / d).rglob("*.py"))}


def imports(f: Path, top_level_only: bool = False) -> set[str]:
    """The product modules ``f`` imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    me = module_name(f)
    package = me if f.name == "__init__.py" else me.rsplit(".", 1)[0]
    tree = ast.parse(f.read_text())
    out = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in MODULES:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != me:
                out.add(name)
    return out


def closure(module: str) -> set[str]:
    """Every product module that importing ``module`` runs: its imports, theirs, and their parent packages."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += imports(MODULES[m])
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]
    return seen


def stage_module(spec: dict) -> str:
    tokens = spec["cmd"].split()
    return tokens[tokens.index("-m") + 1]


def stage_code(spec: dict) -> list[str]:
    """The code deps a stage should list: its module's file first, then its closure, sorted."""
    module = stage_module(spec)
    first = str(MODULES[module].relative_to(ROOT))
    return [first] + sorted(str(MODULES[m].relative_to(ROOT)) for m in closure(module) if m != module)


def rewrite(dvc_yaml: Path = ROOT / "dvc.yaml") -> None:
    text = dvc_yaml.read_text()
    for name, spec in yaml.safe_load(text)["stages"].items():
        data = [d for d in spec["deps"] if not d.startswith("pqd/")]
        block = "".join(f"      - {d}\n" for d in stage_code(spec) + data)
        pattern = re.compile(rf"(\n  {name}:\n(?:.*\n)*?    deps:\n)((?:      - .*\n)+)")
        text, n = pattern.subn(lambda m: m.group(1) + block, text, count=1)
        if n != 1:
            raise SystemExit(f"dvc.yaml: stage {name}: no deps list found")
    dvc_yaml.write_text(text)


if __name__ == "__main__":
    rewrite()
