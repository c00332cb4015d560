"""The one place that runs git and dvc: commands in a project folder, and clones of the project.

Every module that needs git or dvc calls :func:`git` or :func:`dvc`; a project clone that shares the
project's DVC cache (a sweep cell's workspace) is :func:`clone_sharing_cache`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pqd.errors import PqdError

BIN = Path(sys.executable).parent  # this environment's executables: dvc, and the python stage commands call


class GitError(PqdError, RuntimeError):
    """A git command failed; the message is its last error line."""


class DvcError(PqdError, RuntimeError):
    """A dvc command failed; the message is its last error line."""


@dataclass(frozen=True)
class DvcOutcome:
    command: str
    seconds: float
    ran_stages: tuple[str, ...]  # stages dvc really ran (not skipped or restored from its run cache)
    output: str  # what dvc printed (a progress bar's last state only)


def git(cwd: str | Path | None, *args: str) -> str:
    """``git <args>`` in ``cwd`` (None: the current folder); its stdout, or a GitError with its last error line."""
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or [f"exit status {r.returncode}"]
        raise GitError(f"git {' '.join(args[:1])} failed: {lines[-1]}")
    return r.stdout


def dvc(cwd: str | Path, args: list[str], log: Callable[[str], None] | None = None,
        env_vars: dict[str, str | None] | None = None) -> DvcOutcome:
    """Run ``dvc <args>`` in ``cwd`` with this environment's executables first on PATH (stage commands
    call ``python``) and ``env_vars`` set (None: unset), passing each line it prints to ``log`` as it comes (a
    progress bar's last state only); raise DvcError with dvc's last error line when it fails."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    for k, v in (env_vars or {}).items():
        env.pop(k, None) if v is None else env.__setitem__(k, v)
    exe = str(BIN / "dvc") if (BIN / "dvc").exists() else "dvc"
    t0 = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen([exe, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        for raw in proc.stdout or ():
            line = raw.rstrip("\n").split("\r")[-1].rstrip()
            if line:
                lines.append(line)
                if log is not None:
                    log(line)
    seconds = round(time.perf_counter() - t0, 2)
    if proc.returncode != 0:
        errors = [ln for ln in lines if "error" in ln.lower()] or lines or [f"exit status {proc.returncode}"]
        raise DvcError(f"dvc {' '.join(args)} failed: {errors[-1].strip()}")
    ran = tuple(ln.split("'")[1] for ln in lines if ln.startswith("Running stage '"))
    return DvcOutcome(f"dvc {' '.join(args)}", seconds, ran, "\n".join(lines))


def clone(root: str | Path, dest: str | Path, commit: str | None = None) -> Path:
    """``dest``: a git clone of ``root`` checked out (detached) at ``commit`` (default: ``root``'s HEAD), with
    no DVC outputs and its own (empty) DVC cache."""
    dest = Path(dest)
    commit = commit or git(root, "rev-parse", "HEAD").strip()
    git(None, "clone", "-q", "--no-checkout", str(root), str(dest))
    git(dest, "checkout", "-q", "--detach", commit)
    return dest


def clone_sharing_cache(root: Path, dest: Path) -> Path:
    """``dest``: a clone of ``root`` at its HEAD with the work tree's modified and untracked (not ignored) files
    copied over, using ``root``'s DVC cache (and so its run cache); a folder already at ``dest`` is replaced."""
    root, dest = root.resolve(), dest.resolve()
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clone(root, dest)
    changed = git(root, "diff", "--name-only", "HEAD").splitlines()
    changed += git(root, "ls-files", "--others", "--exclude-standard").splitlines()
    for rel in changed:
        if (root / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dest / rel)
    dvc(dest, ["cache", "dir", "--local", cache_dir(root)])
    # the outputs dvc.lock names that the shared cache holds, in place (linked where the file system allows):
    # without them every stage would look changed here, and a stage whose run-cache entry is missing (a cache
    # filled by `dvc pull`, which does not fetch the run cache) would be recomputed
    dvc(dest, ["config", "--local", "cache.type", "reflink,hardlink,copy"])
    dvc(dest, ["checkout", "--allow-missing"])
    return dest


def cache_dir(root: str | Path) -> str:
    """The DVC cache folder ``root`` uses."""
    return dvc(root, ["cache", "dir"]).output.strip().splitlines()[-1]
