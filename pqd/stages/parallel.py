"""Seed ranges on a Dask cluster (``parallel.*``): the one module that knows Dask (docs/scaling.md).

The generate and evaluate stages split their seeds into ranges aligned with the serial run's batches, so a range
computes the same floats wherever it runs, given the same torch thread count (``parallel.threads_per_worker``,
one range at a time per worker). A worker loads the model once (a per-process cache) and writes the range's
files into the stage's temporary output folder under names fixed by the seeds; returned tensors travel back as
safetensors files in a scratch folder. A range rerun after a worker died rewrites the same names with the same
bytes, and the stage takes each range's result exactly once, in range order (:func:`check_complete`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pqd.diffusion.adapter import Conditioning
from pqd.diffusion.sampling import sample
from pqd.errors import InputError, PqdError
from pqd.formats.files import load_tensors
from pqd.formats.images import save_pngs
from pqd.formats.metrics import ParallelRun
from pqd.params import ParallelParams

CACHE_SIZE = 2  # models a worker keeps loaded (two stages, or two sweep cells, may share a cluster)
CONNECT_TIMEOUT_S = 30
SCRATCH = ".ranges"  # inside a stage's temporary output folder: tensors a range returns, removed once read


class ClusterError(PqdError, ConnectionError):
    """The Dask scheduler in parallel.scheduler cannot be reached."""


@dataclass(frozen=True)
class ModelRef:
    """What a worker loads for a stage's ranges: ``load(*args, device=...)``, a module-level function (it
    travels by name), cached per worker process under ``stamp`` (the identity of the files it reads)."""

    load: Callable[..., Any]
    args: tuple[Any, ...]
    device: str
    stamp: str


@dataclass(frozen=True)
class Worker:
    """What a range function gets besides its job: the loaded model, the device, the data shared by every
    range (sent to each worker once), and whether it runs in the stage's own process (progress shown)."""

    model: Any
    device: str
    shared: Any
    local: bool


@dataclass
class Pool:
    """Where ranges run: ``client`` None for the stage's own process, else a ``distributed.Client``."""

    client: Any
    info: ParallelRun

    def record(self, ranges: int) -> ParallelRun:
        """What goes into the stage's metrics: the pool and how many ranges it ran."""
        return dataclasses.replace(self.info, ranges=ranges)


def folder_stamp(*folders: Path) -> str:
    """Identity of the files under ``folders`` for the worker cache (path, size and mtime of each file): a model
    rewritten at the same path is loaded again."""
    h = hashlib.sha256()
    for folder in folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


_CACHE: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def worker_model(ref: ModelRef, device: str) -> Any:
    """``ref``'s model, loaded once per worker process (the last CACHE_SIZE kept)."""
    key = (ref.load.__module__, ref.load.__qualname__, ref.args, device, ref.stamp)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        model = ref.load(*ref.args, device=device)
        _CACHE[key] = model
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
        return model


def worker_device(device: str) -> str:
    """``cuda`` on a worker of a multi-GPU box: worker i of a LocalCluster uses ``cuda:i`` (mod the GPU count);
    a worker started with one visible GPU (CUDA_VISIBLE_DEVICES) uses it. Anything else is unchanged."""
    if device != "cuda" or torch.cuda.device_count() < 2:
        return device
    from distributed import get_worker

    name = str(get_worker().name)
    return f"cuda:{int(name) % torch.cuda.device_count()}" if name.isdigit() else device


@contextlib.contextmanager
def open_pool(pp: ParallelParams, stage: str) -> Iterator[Pool]:
    """The pool ``parallel.*`` asks for; a cluster's scheduler, workers and dashboard are printed when it starts."""
    if pp.scheduler == "none":
        yield Pool(None, ParallelRun("none", 1, torch.get_num_threads(), 0))
        return
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if pp.scheduler == "local":
            # one range at a time per worker (Dask threads 1); torch threads: parallel.threads_per_worker
            cluster = stack.enter_context(LocalCluster(n_workers=pp.workers, threads_per_worker=1, processes=True,
                                                       dashboard_address="127.0.0.1:8787"))
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(pp.scheduler, timeout=CONNECT_TIMEOUT_S))
            except (OSError, TimeoutError) as e:
                raise ClusterError(f"params: parallel.scheduler = {pp.scheduler!r}: no Dask scheduler answers there "
                                   f"({type(e).__name__}): start one (dask scheduler; dask worker {pp.scheduler}) or "
                                   "set parallel.scheduler to none or local") from None
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        address = client.scheduler.address
        print(f"pqd {stage}: Dask scheduler {address} ({workers} workers x {pp.threads_per_worker} torch threads); "
              f"dashboard {client.dashboard_link}", flush=True)
        yield Pool(client, ParallelRun(pp.scheduler, workers, pp.threads_per_worker, 0, client.dashboard_link))


@dataclass(frozen=True)
class _Spilled:
    path: str


def _run_remote(fn: Callable[[Worker, Any], Any], ref: ModelRef, job: Any, shared: Any, part: str, threads: int) -> Any:
    """A range on a Dask worker: ``threads`` torch threads, the cached model; a dict of tensors it returns is
    written to ``part`` (renamed into place, so a worker killed while writing leaves no partial file there)."""
    torch.set_num_threads(threads)
    device = worker_device(ref.device)
    out = fn(Worker(worker_model(ref, device), device, shared, local=False), job)
    if isinstance(out, dict) and out and all(isinstance(v, torch.Tensor) for v in out.values()):
        tmp = f"{part}.tmp-{uuid.uuid4().hex[:8]}"
        save_file({k: v.contiguous() for k, v in out.items()}, tmp)
        os.replace(tmp, part)
        return _Spilled(part)
    return out


def map_ranges(pool: Pool, fn: Callable[[Worker, Any], Any], ref: ModelRef, jobs: Sequence[Any], *, scratch: Path,
               desc: str, local_model: Any = None, shared: Any = None, unit: str = "img") -> list[Any]:
    """``fn(worker, job)`` for every job (each has ``seeds``), results in job order. In the stage's process the
    model is ``local_model`` (else loaded here); on a cluster each worker loads ``ref`` once, ``shared`` is
    sent to every worker once, and returned tensors come back through ``scratch`` (removed afterwards)."""
    total = sum(len(j.seeds) for j in jobs)
    with tqdm(total=total, desc=desc, unit=unit) as bar:
        if pool.client is None:
            model = local_model if local_model is not None else ref.load(*ref.args, device=ref.device)
            results = []
            for job in jobs:
                results.append(fn(Worker(model, ref.device, shared, local=True), job))
                bar.update(len(job.seeds))
            return results
        from distributed import as_completed

        scratch.mkdir(parents=True, exist_ok=True)
        client, token = pool.client, uuid.uuid4().hex[:8]
        shared_f = client.scatter(shared, broadcast=True) if shared is not None else None
        slug = desc.split(" (")[0].replace(" ", "-")
        futures = [client.submit(_run_remote, fn, ref, job, shared_f, str(scratch / f"range-{i:06d}.safetensors"),
                                 pool.info.threads_per_worker, key=f"{slug}-{i:06d}-{token}", pure=False)
                   for i, job in enumerate(jobs)]
        where = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(jobs)
        try:
            for fut in as_completed(futures):
                out = fut.result()
                results[where[fut.key]] = load_tensors(out.path) if isinstance(out, _Spilled) else out
                bar.update(len(jobs[where[fut.key]].seeds))
        except BaseException:
            client.cancel(futures)
            raise
        finally:
            for f in scratch.glob("range-*"):
                f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                scratch.rmdir()
        return results


class UnitExecutor:
    """Reconstruction units on the pool's Dask workers (:func:`pqd.core.reconstruct.reconstruct_model`'s
    ``executor``): each job runs with ``parallel.threads_per_worker`` torch threads on the worker's device."""

    def __init__(self, pool: Pool, device: str) -> None:
        self.inner = pool.client.get_executor(pure=False)
        self.threads, self.device = pool.info.threads_per_worker, device

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.inner.submit(_run_unit_remote, fn, self.threads, self.device, *args)


def _run_unit_remote(fn: Callable[..., Any], threads: int, device: str, *args: Any) -> Any:
    torch.set_num_threads(threads)
    return fn(*args, device=worker_device(device))


def ranges(seeds: list[int], size: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive ranges of ``size`` seeds: the serial run's batches."""
    return [(s, min(s + size, len(seeds))) for s in range(0, len(seeds), size)]


def png_names(seeds: list[int]) -> list[str]:
    return [f"{s:010d}.png" for s in seeds]


def check_complete(folder: Path, names: list[str]) -> None:
    """``folder`` holds exactly the files ``names`` (each once, nothing else): no range was left out or written
    under another name (a bug, not a user error, if it fails)."""
    have = sorted(p.name for p in folder.iterdir())
    want = sorted(names)
    if have != want:
        extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        raise RuntimeError(f"{folder}: ranges incomplete: missing {missing[:3]}, unexpected {extra[:3]}")


# ---- the sampling range shared by generate (FP samples) and evaluate (quantized samples) -----


@dataclass(frozen=True)
class SampleRange:
    """Seeds of one batch, sampled by each named denoiser of the model into its PNG folder. Text models:
    ``row_of`` holds each seed's row of the shared conditioning inputs."""

    seeds: list[int]
    folders: dict[str, str]
    scheduler: Any  # a diffusers scheduler as built for the stage (each range samples with its own copy)
    steps: int
    eta: float
    row_of: list[int] | None
    guidance_scale: float


def sample_range(w: Worker, job: SampleRange) -> dict[str, torch.Tensor]:
    """Sample ``job.seeds`` with every denoiser named in ``job.folders``, write their PNGs, return the images
    {name: float32 [n, C, H, W]}. ``w.shared``: the conditioning inputs by name ([P + 1, ...]) of a conditioned model."""
    cond = None if job.row_of is None else Conditioning(w.shared, job.row_of, job.guidance_scale)
    out = {}
    for name, folder in job.folders.items():
        if name not in w.model:
            raise InputError(f"no {name} denoiser was loaded for this range")
        imgs = sample(w.model[name], copy.deepcopy(job.scheduler), job.seeds, steps=job.steps, eta=job.eta,
                      batch_size=len(job.seeds), device=w.device, progress=False, cond=cond)
        save_pngs(imgs, folder, [n[:-4] for n in png_names(job.seeds)])
        out[name] = imgs
    return out


def sample_sets(pool: Pool, ref: ModelRef, local_model: dict[str, Any], seeds: list[int], folders: dict[str, Path],
                batch_size: int, scheduler: Any, steps: int, eta: float, cond: Conditioning | None, scratch: Path,
                desc: str) -> tuple[dict[str, torch.Tensor], int]:
    """Sample ``seeds`` with each denoiser named in ``folders`` (PNGs written there), in ranges of
    ``batch_size``; returns the images {name: [N, C, H, W]} in seed order and the number of ranges."""
    spans = ranges(seeds, batch_size)
    jobs = [SampleRange(seeds[a:b], {k: str(v) for k, v in folders.items()}, scheduler, steps, eta,
                        None if cond is None else cond.row_of[a:b], cond.guidance_scale if cond else 1.0)
            for a, b in spans]
    parts = map_ranges(pool, sample_range, ref, jobs, scratch=scratch, desc=desc, local_model=local_model,
                       shared=None if cond is None else cond.inputs)
    for folder in folders.values():
        check_complete(folder, png_names(seeds))
    return {k: torch.cat([p[k] for p in parts]) for k in folders}, len(spans)
