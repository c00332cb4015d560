"""Files the stages read and write: atomic output folders, JSON, safetensors, prompt files.

Every reader turns a missing or damaged file into a one-line :class:`~pqd.errors.InputError` naming it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

from pqd.errors import InputError, MissingInputError


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; it appears at ``path`` only when the block succeeds.

    A failing block leaves ``path`` as it was. A process killed outright cannot clean up: its temporary siblings
    are removed the next time this output is built (one writer per output: DVC holds the repository lock).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
        if stale.name.startswith((f".{path.name}.tmp-", f".{path.name}.old-")) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: file not found: expected the file the pipeline wrote (run `dvc repro`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}): expected the file the pipeline wrote (run `dvc repro`)") from None


def require_folder(path: str | Path, made_by: str) -> Path:
    """``path`` if it is a non-empty folder; else a one-line ValueError naming it and the stage that makes it."""
    path = Path(path)
    why = "is missing" if not path.exists() else "is not a folder" if not path.is_dir() else \
        "is empty" if not any(path.iterdir()) else None
    if why:
        raise InputError(f"input folder {path} {why}: expected the complete output of the {made_by} stage "
                         "(run `dvc repro`)")
    return path


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (never a pickle); a missing, truncated or corrupted file is a
    one-line ValueError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"file {path} is missing: expected a safetensors file (run `dvc repro`)")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"file {path} is truncated or corrupted ({reason}): expected a complete safetensors file; "
                         "re-run the stage that wrote it (`dvc repro`)") from None


def read_prompts(path: str | Path, key: str = "generate.prompts") -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped); a missing or empty file is an error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInputError(f"{key} = {str(path)!r}: file not found: expected a file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{key} = {str(path)!r}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}): "
                         "expected a UTF-8 text file with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"{key} = {str(path)!r}: the file holds no prompt: expected one prompt per line")
    return prompts
