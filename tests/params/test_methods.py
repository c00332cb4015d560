"""Method presets: each fills the method-controlled keys; an explicit value wins."""

import pytest

from pqd.params.methods import METHOD_KEYS, PRESETS
from pqd.params import params_from_dict


@pytest.mark.parametrize("method", list(PRESETS))
def test_presets_produce_their_documented_settings(method):
    p = params_from_dict({"calibrate": {"method": method}})
    for key, value in PRESETS[method].items():
        section, name = key.split(".")
        assert getattr(getattr(p, section), name) == value, key


def test_documented_table_matches_presets():
    import pqd.params.methods as m

    doc = m.__doc__
    assert "| calibrate.time_groups | 1 | 1 | 1 | PQD_GROUPS |" in doc
    assert PRESETS["pqd"]["calibrate.time_groups"] == m.PQD_GROUPS > 1
    assert PRESETS["minmax"]["calibrate.reconstruct"] is False
    assert PRESETS["qdiffusion"]["calibrate.split_shortcut"] is True and PRESETS["qdiffusion"]["calibrate.qdrop_p"] == 0
    assert PRESETS["ptq4dm"]["select.timesteps"] == "gaussian" and PRESETS["ptq4dm"]["select.rule"] == "random"


def test_explicit_value_wins_over_preset():
    p = params_from_dict({"calibrate": {"method": "pqd", "time_groups": 1, "qdrop_p": 0.0}, "select": {"rule": "random"}})
    assert p.calibrate.time_groups == 1 and p.calibrate.qdrop_p == 0.0 and p.select.rule == "random"
    assert p.calibrate.reconstruct is True  # the rest still from the preset
    assert set(METHOD_KEYS) == set(PRESETS["minmax"])


def test_time_groups_larger_than_steps_rejected():
    from pqd.params import ParamError

    with pytest.raises(ParamError, match="calibrate.time_groups = 60 is not allowed"):
        params_from_dict({"calibrate": {"time_groups": 60}, "generate": {"steps": 50}})
