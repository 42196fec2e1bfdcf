"""Event handlers: sq, overflow refused (hole 9), unknown names, adding a handler."""

from __future__ import annotations

import pytest

from nimbus.core import events
from nimbus.proto_gen.nimbus import ErrorCode


@pytest.mark.parametrize("n", [0, 1, -7, 46340, -46340])
def test_sq_in_range(n: int) -> None:
    assert events.compute("sq", n) == n * n


@pytest.mark.parametrize("n", [46341, -46341, 2**31 - 1])
def test_sq_overflow_is_an_error_not_a_wrapped_number(n: int) -> None:
    with pytest.raises(events.EventFailed) as e:
        events.compute("sq", n)
    assert e.value.code == ErrorCode.OUT_OF_RANGE


def test_unknown_event() -> None:
    assert not events.is_known("cube")
    with pytest.raises(events.EventFailed) as e:
        events.compute("cube", 2)
    assert e.value.code == ErrorCode.UNKNOWN_EVENT


def test_names_are_case_insensitive_like_the_original() -> None:
    assert events.compute("SQ", 3) == 9


def test_adding_a_handler_is_one_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "HANDLERS", dict(events.HANDLERS))

    @events.handler("boom")
    def boom(n: int) -> int:
        raise RuntimeError("handler bug")

    @events.handler("double")
    def double(n: int) -> int:
        return 2 * n

    assert events.compute("double", 21) == 42
    with pytest.raises(events.EventFailed) as e:
        events.compute("boom", 1)
    assert e.value.code == ErrorCode.INTERNAL
