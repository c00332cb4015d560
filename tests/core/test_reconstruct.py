import concurrent.futures
import copy
import multiprocessing

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.core.modules import quant_layers
from pqd.core.quantize import apply_qstate, fit_qstate, QuantConfig
from pqd.core.adaround import AdaRound, beta_schedule
from pqd.core.modules import ActQuantizer
from pqd.core.qtypes import weight_qtype
from pqd.core.reconstruct import ReconConfig, UnitBatch, qdrop, reconstruct_model, reconstruct_unit, unit_mse


class Block(nn.Module):
    """A tiny residual block: conv -> silu -> conv, plus the input."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, scale=1.0):
        return x + scale * self.conv2(F.silu(self.conv1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, 8, 1)
        self.block = Block()
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(self.block(self.inp(x), scale=0.5))


def inputs(n=3, b=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 8, 6, 6, generator=g) for _ in range(n)]


def quantized_block(bits=4, seed=0, group_size=0):
    torch.manual_seed(seed)
    fp = Block()
    xs = inputs()
    state = fit_qstate(fp, lambda m, sg: [m(x) for x in xs],
                       QuantConfig(weight_bits=bits, act_bits=8, weight_group_size=group_size))
    q = apply_qstate(copy.deepcopy(fp), state)
    with torch.no_grad():
        batches = [UnitBatch((x,), {}, fp(x)) for x in xs]
    return fp, q, batches


def test_adaround_starts_at_float_weight_and_ends_hard():
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    s = w.abs().amax(1) / 7
    ar = AdaRound(w, s, weight_qtype(4))
    assert torch.allclose(ar.soft_weight(), w.clamp(-8 * s[:, None], 7 * s[:, None]), atol=1e-3)
    opt = torch.optim.Adam([ar.V], lr=0.05)
    for it in range(400):
        beta = beta_schedule(it, 400, 0.1)
        loss = (ar.soft_weight() - w).pow(2).sum() + 0.1 * (ar.regularizer(beta) if beta else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ar.hard_fraction() == 1.0  # every h is exactly 0 or 1
    assert torch.equal(ar.soft_weight().detach(), ar.codes().float() * s[:, None])  # soft == hard rounding


def test_beta_schedule_anneals_from_20_to_2():
    assert beta_schedule(0, 100, 0.2) is None
    assert beta_schedule(20, 100, 0.2) == pytest.approx(20.0)
    assert beta_schedule(99, 100, 0.2) == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize("bits,group_size", [(4, 0), (3, 0), (4, 4)])
def test_reconstruction_beats_nearest_rounding(bits, group_size):
    """Also with a weight scale per 4 of the 8 input channels (AdaRound rounds each weight on its group's grid)."""
    fp, q, batches = quantized_block(bits, group_size=group_size)
    assert all((layer.weight_scale.ndim == 2) == bool(group_size) for layer in quant_layers(q).values())
    before = unit_mse(q, batches)
    weights = {n: fp.get_submodule(n).weight.detach() for n in quant_layers(q)}
    log = reconstruct_unit(q, weights, batches, ReconConfig(iters=300, batch_size=32, qdrop_p=0.0),
                           torch.Generator().manual_seed(0))
    assert log["reverted"] == 0.0
    assert log["mse_after"] < 0.9 * before
    assert unit_mse(q, batches) == pytest.approx(log["mse_after"])
    for layer in quant_layers(q).values():  # the learned codes stay on the grid
        assert layer.rounding is None and int(layer.weight_int.min()) >= -(2 ** (bits - 1))
        assert not layer.act.scale.requires_grad


def test_qdrop_noop_at_zero_and_outside_reconstruction():
    torch.manual_seed(0)
    aq = ActQuantizer(4, torch.tensor([0.1]), torch.tensor([8.0]))
    x = torch.randn(64, 8)
    plain = aq(x)
    assert not torch.equal(plain, x)
    with qdrop(aq, 0.0, torch.Generator()):
        assert torch.equal(aq(x), plain)
    with qdrop(aq, 0.5, torch.Generator().manual_seed(1)):
        mixed = aq(x)
        kept_float = (mixed == x) & (plain != x)
        assert 0.3 < kept_float.float().mean() < 0.7
    assert aq.drop_prob == 0.0 and torch.equal(aq(x), plain)  # restored outside the block


def test_qdrop_masks_come_from_the_seeded_generator_not_the_global_rng():
    aq = ActQuantizer(4, torch.tensor([0.1]), torch.tensor([8.0]))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # a different global RNG state must not change the masks
        with qdrop(aq, 0.5, torch.Generator().manual_seed(7)):
            outs.append(aq(x))
    assert torch.equal(outs[0], outs[1])
    with qdrop(aq, 0.5, torch.Generator().manual_seed(8)):
        assert not torch.equal(aq(x), outs[0])  # another seed, other masks


def test_reconstruct_model_walks_units_in_forward_order():
    torch.manual_seed(0)
    fp = Net()
    xs = chain_inputs()
    state = fit_qstate(fp, lambda m, sg: [m(x) for x in xs], QuantConfig(weight_bits=4))
    q = apply_qstate(copy.deepcopy(fp), state)
    with torch.no_grad():
        err0 = sum(float((q(x) - fp(x)).pow(2).mean()) for x in xs)
    log = reconstruct_model(fp, q, ["out", "block", "inp"], lambda m, i: m(xs[i]), [0, 0],
                            ReconConfig(iters=150, batch_size=16, qdrop_p=0.0), progress=False)
    assert [e["unit"] for e in log] == ["inp", "block", "out"]
    with torch.no_grad():
        err1 = sum(float((q(x) - fp(x)).pow(2).mean()) for x in xs)
    assert err1 < err0


def test_zero_iterations_leave_the_unit_exactly_as_fitted():
    """recon_iters = 0: nearest-rounded codes, fitted steps, no rounding module attached, no step that learns."""
    fp, q, batches = quantized_block()
    layers = quant_layers(q)
    codes = {n: l.weight_int.clone() for n, l in layers.items()}
    steps = [a.scale.detach().clone() for a in q.modules() if isinstance(a, ActQuantizer)]
    out = reconstruct_unit(q, {n: fp.get_submodule(n).weight for n in layers}, batches, ReconConfig(iters=0),
                           torch.Generator().manual_seed(0))
    assert out["mse_after"] == out["mse_before"]
    assert all(l.rounding is None and torch.equal(l.weight_int, codes[n]) for n, l in layers.items())
    quantizers = [a for a in q.modules() if isinstance(a, ActQuantizer)]
    assert all(not a.scale.requires_grad for a in quantizers)
    assert all(torch.equal(a.scale, s) for a, s in zip(quantizers, steps))


class Chain(nn.Module):
    """Four quantizable units in a row: enough for waves and a resume part-way."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, 8, 1)
        self.b1, self.b2 = Block(), Block()
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(self.b2(self.b1(self.inp(x))))


UNITS = ["inp", "b1", "b2", "out"]


def chain_inputs():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(16, 3, 6, 6, generator=g) for _ in range(2)]


def chain_setup():
    torch.manual_seed(0)
    fp = Chain()
    xs = chain_inputs()
    state = fit_qstate(fp, lambda m, sg: [m(x) for x in xs], QuantConfig(weight_bits=4))
    return fp, apply_qstate(copy.deepcopy(fp), state), (lambda m, i: m(xs[i]))


def recon(fp, q, run, **kw):
    return reconstruct_model(fp, q, UNITS, run, [0, 0], ReconConfig(iters=40, batch_size=8), seed=5, progress=False,
                             **kw)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def strip(log):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in log]


class Killed(Exception):
    pass


def test_a_run_stopped_part_way_resumes_from_its_finished_units_to_the_same_bytes():
    fp, q_ref, run = chain_setup()
    ref_log = recon(fp, q_ref, run)
    kept = {}

    def finished(unit, result):  # the checkpoint a killed run leaves: the units finished before it died
        kept[unit] = result
        if len(kept) == 2:
            raise Killed

    _, q1, _ = chain_setup()
    with pytest.raises(Killed):
        recon(fp, q1, run, finished=finished)
    assert list(kept) == ["inp", "b1"]
    fresh = []
    _, q2, _ = chain_setup()
    log = recon(fp, q2, run, saved=kept.get, finished=lambda u, r: fresh.append(u))
    assert fresh == ["b2", "out"]  # only the units not finished before are computed
    assert same_state(q2, q_ref) and strip(log) == strip(ref_log)


class Holding:
    """An executor that keeps every job it is handed and runs it here."""

    def __init__(self):
        self.jobs = []

    def submit(self, fn, job):
        self.jobs.append(job)
        fut = concurrent.futures.Future()
        fut.set_result(fn(job))
        return fut


def test_a_job_for_another_process_shares_no_storage_with_the_models_or_their_inputs():
    """A process pool moves a pickled tensor's storage into shared memory from a feeder thread while the models
    still run here: a job that shared a storage with the FP model's weights or the calibration inputs got garbage
    (the pooled run below differed from the serial one in about 1 of 13 runs before the jobs owned their tensors)."""
    fp, q, _ = chain_setup()
    xs, held = chain_inputs(), Holding()
    recon(fp, q, lambda m, i: m(xs[i]), executor=held, inputs="float")
    theirs = {t.untyped_storage().data_ptr() for t in [*fp.parameters(), *xs]}
    for job in held.jobs:
        mine = [*job.weights.values(), *(a for b in job.batches for a in (*b.args, *b.kwargs.values(), b.target)
                                         if isinstance(a, torch.Tensor))]
        assert not theirs & {t.untyped_storage().data_ptr() for t in mine}, job.unit
    assert [j.unit for j in held.jobs] == UNITS


def test_units_run_in_another_process_give_the_same_bytes_as_in_this_one(one_thread):
    """Waves of two units: recorded together, reconstructed concurrently on a process pool, loaded in forward
    order; and the FP-input variant, where every unit is independent. One torch thread here and in the pool's
    processes (floats depend on the thread count)."""
    for kw in ({"wave": 2}, {"inputs": "float"}):
        fp, q_serial, run = chain_setup()
        serial = recon(fp, q_serial, run, **kw)
        _, q_pool, _ = chain_setup()
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=torch.set_num_threads, initargs=(1,)) as ex:
            pooled = recon(fp, q_pool, run, executor=ex, concurrency=2, **kw)
        assert same_state(q_pool, q_serial) and strip(pooled) == strip(serial), kw
    _, q_seq, _ = chain_setup()
    recon(fp, q_seq, run)
    assert not same_state(q_seq, q_serial)  # the variants are different methods
