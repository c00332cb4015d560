"""Lineage, the one place that knows how the product identifies what it made: sha256 of files and trees, the md5s
DVC records in dvc.lock, the per-stage hashes of dvc.lock, and the git commit (through :mod:`pqd.formats.repo`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqd.formats.repo import GitError, git

# files of a model folder that hold weights (hashed into the model's digest)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
# the model stage's record in its model folder: source, revision, per-file weight hashes and model_sha256
MODEL_RECORD = "model.json"


# ---- hashes ----------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def md5_file(path: str | Path) -> str:
    """md5 of a file's bytes, as DVC records it in dvc.lock."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def hash_tree(root: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` by POSIX relative path, sorted; names in ``exclude`` skipped."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


def dvc_dir_md5(folder: Path) -> str:
    """The md5 DVC records in dvc.lock for a directory output: md5 of the JSON list of its files' md5s."""
    entries = [{"md5": md5_file(p), "relpath": p.relative_to(folder).as_posix()}
               for p in sorted(folder.rglob("*")) if p.is_file()]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no spaces: the same text for equal data, to hash."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def weight_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of every weight file of a model folder, by relative path."""
    return {k: v for k, v in hash_tree(model_dir).items() if k.endswith(WEIGHT_SUFFIXES)}


def model_digest(weights: dict[str, str]) -> str:
    """One sha256 for the whole model: over the sorted 'path sha256' lines of its weight files."""
    return hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(weights.items())).encode()).hexdigest()


# ---- git -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GitState:
    commit: str | None  # None outside a git work tree
    dirty: bool | None  # uncommitted changes to tracked files


def git_commit(cwd: Path | None = None) -> GitState:
    """The current git commit and whether the work tree has uncommitted changes (None outside git)."""
    try:
        rev = git(cwd, "rev-parse", "HEAD").strip()
        return GitState(rev, bool(git(cwd, "status", "--porcelain", "--untracked-files=no").strip()))
    except (OSError, GitError):
        return GitState(None, None)


def git_file(root: Path, commit: str, path: str) -> str | None:
    """The text of ``path`` at ``commit`` (None when the commit or the file is not there)."""
    try:
        return git(root, "show", f"{commit}:{path}")
    except GitError:
        return None


# ---- dvc.yaml and dvc.lock -------------------------------------------------------------------


def stage_options(dvc_yaml: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per stage, the ``--option value`` pairs of its command: the paths it reads and writes."""
    out: dict[str, dict[str, str]] = {}
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        tokens = shlex.split(str(stage.get("cmd", "")))
        out[name] = {tok[2:]: nxt for tok, nxt in zip(tokens, tokens[1:])
                     if tok.startswith("--") and not nxt.startswith("--")}
    return out


def lock_hash(entries: list[dict[str, Any]] | None, path: str) -> str | None:
    """The md5 a dvc.lock ``deps``/``outs`` list records for ``path`` (None when absent)."""
    for e in entries or []:
        if e.get("path") == path:
            return e.get("md5")
    return None


def lock_stage_hashes(lock: dict[str, Any]) -> dict[str, str]:
    """``dvc.lock.<stage>``: sha256 of each stage's dvc.lock entry (its deps, params and outs hashes)."""
    return {f"dvc.lock.{s}": sha256_text(canonical_json(e)) for s, e in (lock.get("stages") or {}).items()}


def lock_ties_metrics(lock: dict[str, Any], options: dict[str, dict[str, str]], metrics_file: Path) -> tuple[bool, str]:
    """Whether dvc.lock ties the evaluation to the export: evaluate consumed the hash export made, and
    ``metrics_file`` (evaluate.json) is the one dvc recorded. Returns (tied, what was found)."""
    stages = lock.get("stages") or {}
    export_path, metrics_path = options["export"]["out"], options["evaluate"]["metrics"]
    made = lock_hash(stages.get("export", {}).get("outs"), export_path)
    used = lock_hash(stages.get("evaluate", {}).get("deps"), export_path)
    if made is None or made != used:
        return False, f"dvc.lock: evaluate used {export_path} {used} but export made {made}: run dvc repro"
    recorded = lock_hash(stages.get("evaluate", {}).get("outs"), metrics_path)
    if not metrics_file.is_file() or md5_file(metrics_file) != recorded:
        return False, f"{metrics_path} differs from the hash in dvc.lock: run dvc repro"
    return True, f"evaluate ran on export {made}"
