"""The project's shared DVC remote: setting it, moving data, what a release records about it, and pulling a
release's outputs back from it to verify them (``pqd audit --remote``).

Push and pull move every cached output and DVC's run cache, so a fresh clone plus ``make pull`` makes ``dvc
repro`` a no-op and another machine's sweep restores stages instead of recomputing them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pqd.errors import InputError, PqdError, command
from pqd.formats.lineage import dvc_dir_md5, md5_file
from pqd.formats.repo import DvcError, GitError, clone, dvc

REMOTE_TAG, REMOTE_NAME_TAG, OUT_TAG = "dvc.remote", "dvc.remote.name", "dvc.out."
DEFAULT_NAME = "storage"


class RemoteError(PqdError, RuntimeError):
    """A DVC remote that cannot be set, reached, or give what was pushed to it."""


@dataclass(frozen=True)
class Remote:
    name: str
    url: str  # as DVC resolves it (a local path is absolute)


def _dvc(root: Path, args: list[str], what: str) -> str:
    """``dvc <args>`` in ``root``, what it printed; a RemoteError with dvc's last error line when it fails."""
    try:
        return dvc(root, args).output
    except DvcError as e:
        raise RemoteError(f"{what}: {e}") from None


def default_remote(root: str | Path) -> Remote | None:
    """The project's default DVC remote (``core.remote``), or None when it has none."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            conf = repo.config
    except NotDvcRepoError:
        return None
    name = conf["core"].get("remote")
    return Remote(name, str(conf["remote"][name]["url"])) if name and name in conf["remote"] else None


def set_remote(root: str | Path, url: str, name: str = DEFAULT_NAME) -> Remote:
    """Make ``url`` the project's default remote (written to .dvc/config: commit it so the team shares it)."""
    if "://" in url and not url.startswith(("s3://", "file://")):
        raise InputError(f"REMOTE = {url!r} is not allowed: expected a local path or s3://bucket/path "
                         "(other DVC remotes work too with their plugin: dvc remote add -d)")
    if url.startswith("s3://"):
        try:
            import dvc_s3  # noqa: F401
        except ImportError:
            raise InputError(f"REMOTE = {url!r} needs the dvc-s3 plugin: pip install 'dvc-s3==3.3.0'") from None
    elif not url.startswith("file://"):
        url = str(Path(url).expanduser().resolve())
        Path(url).mkdir(parents=True, exist_ok=True)
    _dvc(Path(root), ["remote", "add", "--default", "--force", name, url], "make remote")
    return default_remote(root) or Remote(name, url)


def cached_outputs(root: str | Path, lock: dict[str, Any]) -> dict[str, str]:
    """{path: md5} of every cached stage output (dvc.yaml ``outs``) that ``lock`` records: what a remote holds."""
    spec = yaml.safe_load((Path(root) / "dvc.yaml").read_text(encoding="utf-8")) or {}
    outs = {o if isinstance(o, str) else next(iter(o)) for st in (spec.get("stages") or {}).values()
            for o in st.get("outs", []) if isinstance(o, str) or next(iter(o.values()), {}).get("cache", True)}
    return {o["path"]: o["md5"] for st in (lock.get("stages") or {}).values() for o in st.get("outs", [])
            if o.get("path") in outs and o.get("md5")}


def release_tags(root: str | Path, lock: dict[str, Any] | None) -> dict[str, str]:
    """Registry tags of a release: its remote (``dvc.remote``: url, or 'none') and the exact DVC hash of each
    cached output (``dvc.out.<path>``), so ``pqd audit --remote`` can pull and check them."""
    remote = default_remote(root)
    tags = {REMOTE_TAG: remote.url if remote else "none", REMOTE_NAME_TAG: remote.name if remote else "none"}
    return tags | {OUT_TAG + p: md5 for p, md5 in sorted(cached_outputs(root, lock or {}).items())}


def output_md5(path: Path) -> str | None:
    """The md5 DVC records for a file or directory output (None when it is not there)."""
    return dvc_dir_md5(path) if path.is_dir() else md5_file(path) if path.is_file() else None


def pull_release(root: Path, commit: str, url: str, dest: Path) -> Path:
    """A clone of ``root`` at ``commit`` in ``dest`` whose cached outputs are pulled from the remote at ``url``
    into the clone's own empty cache, so every byte checked comes from the remote."""
    try:
        clone(root, dest, commit)
    except GitError as e:
        raise RemoteError(f"the audit's clone of {root} at {commit}: {e}") from None
    _dvc(dest, ["remote", "add", "--local", "--default", "--force", "pqd-audit", url], "pqd audit")
    _dvc(dest, ["pull", "--force"], f"pull from {url}")
    return dest


def check_pulled(dest: Path, tags: dict[str, str]) -> tuple[bool, str]:
    """Every ``dvc.out.<path>`` tag against the pulled output's recomputed md5."""
    recorded = {k[len(OUT_TAG):]: v for k, v in tags.items() if k.startswith(OUT_TAG)}
    if not recorded:
        return False, "the release records no dvc.out.<path> hashes (registered before remotes were recorded)"
    for path, md5 in sorted(recorded.items()):
        have = output_md5(dest / path)
        if have != md5:
            return False, f"{path} pulled from the remote hashes to {have}, the release records {md5}"
    return True, f"{len(recorded)} outputs pulled from {tags.get(REMOTE_TAG)} match the release's hashes"


@command("pqd remote")
def main(argv: list[str] | None = None) -> int:
    """``python -m pqd.ops.remote set <url> | push | pull | show [--root DIR]``."""
    ap = argparse.ArgumentParser(prog="python -m pqd.ops.remote", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["set", "push", "pull", "show"])
    ap.add_argument("url", nargs="?", help="set: a local path or s3://bucket/path")
    ap.add_argument("--root", default=".")
    ap.add_argument("--name", default=DEFAULT_NAME)
    args = ap.parse_args(argv)
    root = Path(args.root)
    if args.command == "set":
        if not args.url:
            raise InputError("make remote: REMOTE is empty: expected a local path or s3://bucket/path")
        r = set_remote(root, args.url, args.name)
        print(f"pqd remote: default remote {r.name} = {r.url} (in .dvc/config: commit it to share it)")
        return 0
    remote = default_remote(root)
    if remote is None:
        raise InputError("this project has no default DVC remote: run make remote REMOTE=<path or s3://...> first")
    if args.command == "show":
        print(f"pqd remote: {remote.name} = {remote.url}")
        return 0
    out = _dvc(root, [args.command, "--run-cache"], f"make {args.command}")
    print(out.strip().splitlines()[-1] if out.strip() else f"{args.command}: nothing to do")
    print(f"pqd remote: {args.command} {'to' if args.command == 'push' else 'from'} {remote.name} ({remote.url}) done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
