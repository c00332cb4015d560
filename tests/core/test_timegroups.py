import torch

from pqd.core.quantize import apply_qstate, fit_qstate, QuantConfig
from pqd.core.timegroups import set_time_group, TimeGroups
from pqd.core.modules import ActQuantizer


def test_groups_are_contiguous_runs_of_the_schedule():
    ts = [980 - 20 * i for i in range(50)]  # DDIM-50 style, descending
    tg = TimeGroups.from_schedule(ts, 4)
    groups = tg.group_of(torch.tensor(ts, dtype=torch.float32)).tolist()
    assert groups == sorted(groups)  # contiguous, first steps in group 0
    assert [groups.count(g) for g in range(4)] == [12, 13, 13, 12]
    assert tg.group_of(980.0).item() == 0 and tg.group_of(0.0).item() == 3
    assert TimeGroups.from_schedule(ts, 1).group_of(torch.tensor([980.0, 0.0])).tolist() == [0, 0]


def test_too_many_groups_rejected():
    import pytest

    with pytest.raises(ValueError, match="time groups = 6"):
        TimeGroups.from_schedule([3.0, 2.0, 1.0], 6)


def test_each_group_fitted_on_its_own_inputs():
    lin = torch.nn.Linear(4, 4)
    small, large = torch.randn(64, 4) * 0.1, torch.randn(64, 4) * 10

    def forward_all(m, set_group):
        set_group(0)
        m(small)
        set_group(1)
        m(large)

    state = fit_qstate(lin, forward_all, QuantConfig(time_groups=2, act_range="minmax"))
    s = state[""].act_scale
    assert s.shape == (2, 1) and s[1, 0] > 20 * s[0, 0]
    q = apply_qstate(torch.nn.Sequential(lin), {"0": state[""]})
    set_time_group(q, 1)
    assert q[0].act.group == 1


def test_split_quantizer_uses_separate_parameters_per_part():
    aq = ActQuantizer(8, torch.tensor([[0.01, 1.0]]), torch.tensor([[128.0, 128.0]]), split=2)
    x = torch.full((1, 4, 1, 1), 0.123)
    y = aq(x)
    assert torch.allclose(y[:, :2], torch.tensor(0.12))  # fine grid on the first part
    assert torch.equal(y[:, 2:], torch.zeros(1, 2, 1, 1))  # coarse grid on the second
