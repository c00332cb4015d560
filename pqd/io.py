"""Small file helpers shared by the stages: atomic outputs, hashes, JSON, PNG."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; it appears at ``path`` only when the block succeeds.

    An interrupted or failing block leaves ``path`` as it was (an earlier complete output, or nothing)
    and removes the temporary directory. A process killed outright (SIGKILL, power loss) cannot clean up:
    its temporary siblings are removed the next time this output is built (one writer per output: DVC
    holds the repository lock while a stage runs).
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
        raise FileNotFoundError(f"{path}: file not found: expected the file the pipeline wrote (run `dvc repro`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}): expected the file the pipeline wrote (run `dvc repro`)") from None


def require_folder(path: str | Path, made_by: str) -> Path:
    """``path`` if it is a non-empty folder; else a one-line ValueError naming it and the stage that makes it."""
    path = Path(path)
    why = "is missing" if not path.exists() else "is not a folder" if not path.is_dir() else \
        "is empty" if not any(path.iterdir()) else None
    if why:
        raise ValueError(f"input folder {path} {why}: expected the complete output of the {made_by} stage "
                         "(run `dvc repro`)")
    return path


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (never a pickle); a missing, truncated or corrupted file is a
    one-line ValueError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file {path} is missing: expected a safetensors file (run `dvc repro`)")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"file {path} is truncated or corrupted ({reason}): expected a complete safetensors file; "
                         "re-run the stage that wrote it (`dvc repro`)") from None


def read_prompts(path: str | Path, key: str = "generate.prompts") -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped); a missing or empty file is an error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key} = {str(path)!r}: file not found: expected a file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{key} = {str(path)!r}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}): "
                         "expected a UTF-8 text file with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{key} = {str(path)!r}: the file holds no prompt: expected one prompt per line")
    return prompts


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` by POSIX relative path, sorted; names in ``exclude`` skipped."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


def dir_size(root: str | Path, suffixes: tuple[str, ...] | None = None) -> int:
    """Total bytes of the files under ``root`` (only those ending in ``suffixes`` when given)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*")
               if p.is_file() and (suffixes is None or p.name.endswith(suffixes)))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float images [N, C, H, W] in [0, 1] -> uint8 [N, H, W, C] (rounded)."""
    x = images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return x.permute(0, 2, 3, 1).numpy()


def save_pngs(images: torch.Tensor, folder: str | Path, names: list[str]) -> None:
    """Write each image [C, H, W] in [0, 1] as ``folder/<name>.png`` (grayscale when C == 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for arr, name in zip(to_uint8(images), names):
        img = Image.fromarray(arr[..., 0], mode="L") if arr.shape[-1] == 1 else Image.fromarray(arr)
        img.save(folder / f"{name}.png")


def image_grid(images: torch.Tensor, cols: int, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile images [N, C, H, W] in [0, 1] into one RGB PIL image, upscaled by ``scale`` (nearest)."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    if c == 1:
        arr = np.repeat(arr, 3, axis=-1)
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, cl = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + cl * (w + pad): pad + cl * (w + pad) + w] = arr[i]
    img = Image.fromarray(grid)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
