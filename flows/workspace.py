"""Isolated workspaces for sweep cells that run at the same time: a clone of the project sharing its DVC cache,
so two cells never write the same ``data/`` folder while what one computed is restored for the others. A cell's
experiment goes back with ``dvc exp push`` (git refs only: the data is already in the shared cache).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.tasks import DvcOutcome, run_dvc
from pqd.formats.repo import clone_sharing_cache
from pqd.params import apply_overrides

SWEEP_DIR = ".dvc/tmp/pqd-sweep"  # under the project: DVC ignores it, and every worker of a cluster sees it


def clone(root: Path, dest: Path) -> Path:
    """``dest``: a clone of ``root`` at its HEAD with the work tree's changes, sharing ``root``'s DVC cache
    (:func:`pqd.formats.repo.clone_sharing_cache`)."""
    return clone_sharing_cache(root, dest)


@task(name="prepare workspace", cache_policy=NO_CACHE)
def prepare_workspace(root: str, dest: str) -> str:
    """A cell's own workspace (:func:`clone`); returns its path."""
    ws = clone(Path(root), Path(dest))
    get_run_logger().info("workspace %s (a clone of %s sharing its DVC cache)", ws, root)
    return str(ws)


@task(name="shared stages", cache_policy=NO_CACHE)
def shared_stages(root: str, dest: str, overrides: list[str], target: str,
                  env_vars: dict[str, str | None] | None = None) -> DvcOutcome:
    """Reproduce ``target`` and what it needs once, with the overrides every cell shares, in a scratch clone:
    its outputs land in the shared cache and run cache, where each cell finds them."""
    ws = clone(Path(root), Path(dest))
    params = ws / "params.yaml"
    params.write_text(yaml.safe_dump(apply_overrides(yaml.safe_load(params.read_text()) or {}, overrides),
                                     sort_keys=False))
    try:
        out = run_dvc(ws, ["repro", target], get_run_logger().info, env_vars)
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    get_run_logger().info("%s: %.1f s, stages run: %s", out.command, out.seconds, ", ".join(out.ran_stages) or "none")
    return out


@task(name="push experiment", cache_policy=NO_CACHE)
def push_experiment(ws: str, name: str) -> None:
    """The cell's experiment into the project it was cloned from (``dvc exp push``; the data is in the shared
    cache already), so ``dvc exp show`` there lists it; the workspace is removed afterwards."""
    run_dvc(ws, ["exp", "push", "--force", "--no-cache", "origin", name], get_run_logger().info)
    shutil.rmtree(ws, ignore_errors=True)
