"""Recordings on disk: the same reconstruction as in memory, bit for bit, and the files go when done."""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.core.quantize import apply_qstate, fit_qstate, qstate_of, QuantConfig
from pqd.core.reconstruct import ReconConfig, reconstruct_model
from pqd.formats.spill import DiskList, store_factory


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, 8, 1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x, scale=0.5):
        h = self.inp(x)
        return self.out(h + scale * self.body(F.silu(h)))


def test_disklist_round_trips_and_cleans_up(tmp_path):
    dl = DiskList(tmp_path / "rec")
    item = ((torch.randn(2, 3), 0.5), {"temb": torch.randn(2, 4)})
    dl.append(item)
    dl.append(torch.arange(3))
    assert len(dl) == 2 and len(list((tmp_path / "rec").iterdir())) == 2
    args, kwargs = dl[0]
    assert torch.equal(args[0], item[0][0]) and args[1] == 0.5 and torch.equal(kwargs["temb"], item[1]["temb"])
    assert torch.equal(dl[1], torch.arange(3)) and list(dl)[1].tolist() == [0, 1, 2]
    del dl
    assert not (tmp_path / "rec").exists()


def test_reconstruction_on_disk_equals_in_memory(tmp_path):
    torch.manual_seed(0)
    fp = Net()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 3, 6, 6, generator=g) for _ in range(3)]
    state = fit_qstate(fp, lambda m, sg: [m(x) for x in xs], QuantConfig(weight_bits=4))
    cfg = ReconConfig(iters=30, batch_size=4, qdrop_p=0.5)
    units = ["inp", "body", "out"]
    results = []
    sizes = {"inp": 10, "body": 10**9, "out": 10**9}  # body and out over the budget: on disk
    made = []

    def factory(unit, kind):
        s = store_factory(tmp_path / "spill", sizes, 1000)(unit, kind)
        made.append((unit, kind, type(s).__name__))
        return s

    for store in (None, factory):
        q = apply_qstate(copy.deepcopy(fp), state)
        kw = {} if store is None else {"store": store}
        torch.manual_seed(5)  # QDrop draws from the global generator
        log = reconstruct_model(fp, q, units, lambda m, i: m(xs[i]), [0, 0, 0], cfg, seed=1, progress=False, **kw)
        results.append((log, qstate_of(q)))
    (log_m, st_m), (log_d, st_d) = results
    assert [e["mse_after"] for e in log_m] == [e["mse_after"] for e in log_d]
    for name in st_m:
        assert torch.equal(st_m[name].weight_int, st_d[name].weight_int)
        assert torch.equal(st_m[name].act_scale, st_d[name].act_scale)
    assert ("body", "in", "DiskList") in made and ("inp", "in", "list") in made
    assert not any((tmp_path / "spill").iterdir())  # every unit's files removed
