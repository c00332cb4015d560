"""Sharded sampling on Dask (pqd.stages.parallel): the generate and evaluate stages give the same bytes on a
2-worker cluster as in one process with the same torch thread count; a worker killed mid-range has its range
run again, once; the cluster is recorded in the metrics, never in the outputs."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from support.projects import clone, free_port, reproduced_project
from pqd.diffusion.adapter import load_denoiser
from pqd.diffusion.sampling import make_scheduler, sample
from pqd.formats.files import load_tensors
from pqd.params import ParamError, params_from_dict
from pqd.stages import calibrate, evaluate, generate, parallel


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_pipeline, ts_features):
    return clone(reproduced_project(tmp_path_factory, tiny_pipeline, ts_features),
                 tmp_path_factory.mktemp("par") / "p")


def params_of(project: Path, **sections):
    data = yaml.safe_load((project / "params.yaml").read_text())
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return params_from_dict(data)


@pytest.fixture(scope="module")
def cluster():
    """A running 2-worker cluster (processes, one Dask thread each) that the stages reach by its address."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, Client(c) as cl:
        yield c, cl


def test_parallel_params_are_validated_in_one_line():
    assert params_from_dict({"parallel": {"scheduler": "tcp://10.0.0.5:8786"}}).parallel.scheduler == "tcp://10.0.0.5:8786"
    with pytest.raises(ParamError, match=r"parallel.scheduler = 'dask' is not allowed: expected 'none', 'local' or a "
                                         r"Dask scheduler address like 'tcp://10.0.0.5:8786'"):
        params_from_dict({"parallel": {"scheduler": "dask"}})
    with pytest.raises(ParamError, match=r"parallel.workers = 0 is not allowed: expected an integer in \[1, 1024\]"):
        params_from_dict({"parallel": {"workers": 0}})


def test_ranges_follow_the_serial_batches_and_a_missing_file_is_caught(tmp_path):
    assert parallel.ranges(list(range(10)), 4) == [(0, 4), (4, 8), (8, 10)]
    (tmp_path / "0000000000.png").write_bytes(b"x")
    parallel.check_complete(tmp_path, parallel.png_names([0]))
    with pytest.raises(RuntimeError, match=r"ranges incomplete: missing \['0000000001.png'\]"):
        parallel.check_complete(tmp_path, parallel.png_names([0, 1]))


def test_an_unreachable_scheduler_is_one_line(monkeypatch):
    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 2)
    p = params_from_dict({"parallel": {"scheduler": f"tcp://127.0.0.1:{free_port()}"}})
    with pytest.raises(parallel.ClusterError, match=r"parallel.scheduler = 'tcp://127.0.0.1:\d+': no Dask scheduler "
                                                    r"answers there"):
        with parallel.open_pool(p.parallel, "generate"):
            pass


@pytest.mark.slow  # starts a LocalCluster (worker processes import torch and diffusers)
def test_generate_on_a_two_worker_local_cluster_is_byte_identical_to_serial(project, tmp_path, one_thread, capsys):
    g = {"steps": 8, "calib_seeds": 5, "shard_size": 2, "eval_samples": 10, "batch_size": 4}
    serial = params_of(project, generate=g)
    local = params_of(project, generate=g, parallel={"scheduler": "local", "workers": 2, "threads_per_worker": 1})
    model = project / "data/model"
    m0 = generate.run(serial, model, tmp_path / "none/traj", tmp_path / "none/fp")
    m1 = generate.run(local, model, tmp_path / "local/traj", tmp_path / "local/fp")
    # Dask's default port, or the next free one when another cluster holds it (pytest-xdist runs two test processes)
    assert re.search(r"dashboard http://127\.0\.0\.1:\d+/status", capsys.readouterr().out)
    for out in ("traj", "fp"):
        a, b = tree_bytes(tmp_path / "none" / out), tree_bytes(tmp_path / "local" / out)
        assert sorted(a) == sorted(b) and a == b, out
    assert len(tree_bytes(tmp_path / "none/fp/a")) == 10 and len(tree_bytes(tmp_path / "none/traj")) == 3 + 2
    # the reference: one plain sampling call over the evaluation seeds, in the serial run's batches
    den = load_denoiser(model, "cpu")
    ref = sample(den, make_scheduler("ddim", den.scheduler_config, den.scheduler_class), list(range(10)), steps=8,
                 batch_size=4, progress=False)
    assert torch.equal(load_tensors(tmp_path / "local/fp/a.safetensors")["images"], ref)
    # recorded beside the outputs, not in them: 3 shards + 3 + 3 batches
    assert (m0.parallel.scheduler, m0.parallel.workers, m0.parallel.ranges) == ("none", 1, 9)
    assert (m1.parallel.scheduler, m1.parallel.workers, m1.parallel.threads_per_worker, m1.parallel.ranges) == \
        ("local", 2, 1, 9)


@pytest.mark.slow  # a Dask cluster
def test_evaluate_on_a_running_scheduler_is_byte_identical_to_serial(project, tmp_path, one_thread, cluster,
                                                                     monkeypatch):
    monkeypatch.chdir(project)  # evaluate.reference is data/samples/fp/b
    c, _ = cluster
    d = project / "data"
    outs = {}
    for name, sched in (("none", "none"), ("tcp", c.scheduler_address)):
        p = params_of(project, evaluate={"batch_size": 3}, parallel={"scheduler": sched})
        outs[name] = evaluate.run(p, d / "model", d / "export", d / "samples/fp", tmp_path / name, tmp_path / f"{name}.png")
    assert tree_bytes(tmp_path / "none") == tree_bytes(tmp_path / "tcp")
    assert len(tree_bytes(tmp_path / "tcp/images")) == 8 and len(tree_bytes(tmp_path / "tcp/images_simulated")) == 8
    assert (tmp_path / "none.png").read_bytes() == (tmp_path / "tcp.png").read_bytes()
    assert outs["none"].fid_quant_vs_fp == outs["tcp"].fid_quant_vs_fp
    assert outs["tcp"].protocol.parallel.scheduler == c.scheduler_address and outs["tcp"].protocol.parallel.ranges == 3


def _executing(dask_worker) -> list[str]:
    return [str(ts.key) for ts in dask_worker.state.executing]


@pytest.mark.slow  # a Dask cluster
def test_a_worker_killed_mid_range_has_its_range_rerun_once(project, tmp_path, one_thread, cluster):
    c, client = cluster
    g = {"steps": 40, "calib_seeds": 2, "shard_size": 2, "eval_samples": 12, "batch_size": 3}
    model = project / "data/model"
    generate.run(params_of(project, generate=g), model, tmp_path / "none/traj", tmp_path / "none/fp")
    killed: list[tuple[str, int]] = []

    def kill_one_mid_range() -> None:
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            pids = client.run(os.getpid)
            for addr, keys in client.run(_executing).items():
                if any(k.startswith("FP-samples-a") for k in keys):
                    os.kill(pids[addr], signal.SIGKILL)
                    killed.append((next(k for k in keys if k.startswith("FP-samples-a")), pids[addr]))
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_mid_range)
    killer.start()
    m = generate.run(params_of(project, generate=g, parallel={"scheduler": c.scheduler_address}), model,
                     tmp_path / "tcp/traj", tmp_path / "tcp/fp")
    killer.join()
    assert killed, "no worker was caught running an FP-samples-a range"
    assert killed[0][1] not in client.run(os.getpid).values()  # that process is gone; its range ran elsewhere
    for out in ("traj", "fp"):
        assert tree_bytes(tmp_path / "none" / out) == tree_bytes(tmp_path / "tcp" / out), out
    assert len(tree_bytes(tmp_path / "tcp/fp/a")) == 12 and m.parallel.ranges == 1 + 4 + 4
    assert load_tensors(tmp_path / "tcp/fp/a.safetensors")["seeds"].tolist() == list(range(12))


@pytest.mark.slow  # a Dask cluster
def test_calibrate_reconstructs_units_on_a_running_scheduler_to_the_bytes_of_a_serial_run(project, tmp_path, one_thread,
                                                                                         cluster):
    """The two concurrent variants of block reconstruction (FP inputs; waves of 2 units), in the stage's process
    and as Dask tasks: the same qstate bytes."""
    c, _ = cluster
    d = project / "data"
    for i, variant in enumerate(({"recon_inputs": "float"}, {"recon_wave": 2})):
        for sched in ("none", c.scheduler_address):
            out = tmp_path / f"{i}-{'tcp' if sched != 'none' else 'none'}"
            p = params_of(project, calibrate={"method": "pqd", **variant}, parallel={"scheduler": sched},
                          checkpoint={"dir": str(out) + "-checkpoints"})
            m = calibrate.run(p, d / "model", d / "calib", out)
        assert m.reconstructed_units > 2
        assert tree_bytes(tmp_path / f"{i}-none") == tree_bytes(tmp_path / f"{i}-tcp"), variant
