"""The one-line shell every ``python -m pqd...`` command runs in (pqd.errors.command)."""

from __future__ import annotations

import pytest

from pqd.errors import InputError, ParamError, command


@command("pqd thing")
def _main(error: BaseException | None) -> int:
    if error is not None:
        raise error
    return 0


def test_a_user_error_is_one_line_and_exit_status_2(capsys, monkeypatch):
    monkeypatch.delenv("PQD_DEBUG", raising=False)
    assert _main(None) == 0
    assert _main(InputError("x = 3 is not allowed: expected 1 or 2\nmore detail")) == 2
    assert capsys.readouterr().err == "pqd thing: error: x = 3 is not allowed: expected 1 or 2\n"


def test_pqd_debug_keeps_the_traceback_and_a_bug_always_does(monkeypatch):
    monkeypatch.delenv("PQD_DEBUG", raising=False)
    with pytest.raises(KeyError):
        _main(KeyError("a bug"))
    monkeypatch.setenv("PQD_DEBUG", "1")
    with pytest.raises(ParamError, match="bad"):
        _main(ParamError("bad"))


def test_only_the_named_errors_become_one_line(monkeypatch):
    monkeypatch.delenv("PQD_DEBUG", raising=False)
    with pytest.raises(InputError):
        command("pqd", (ParamError,))(_main.__wrapped__)(InputError("not a param"))
