"""Event handlers: what the event consumer computes for each event name.

Adding an event is one function:

    @handler("double")
    def double(n: int) -> int:
        return 2 * n

A handler returns the result or raises `EventFailed`; a result that does not fit the int32
`result` field is refused with OUT_OF_RANGE instead of wrapping (the original's `sq` wrapped
silently for |n| > 46340: hole 9).
"""

from __future__ import annotations

from collections.abc import Callable

from nimbus.wire import messages as m

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

Handler = Callable[[int], int]
HANDLERS: dict[str, Handler] = {}


class EventFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def handler(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[name.lower()] = fn
        return fn

    return register


def is_known(event_name: str) -> bool:
    return event_name.lower() in HANDLERS


def compute(event_name: str, number: int) -> int:
    fn = HANDLERS.get(event_name.lower())
    if fn is None:
        raise EventFailed(
            m.UNKNOWN_EVENT, f"unknown event {event_name!r}; known: {sorted(HANDLERS)}"
        )
    try:
        result = fn(number)
    except EventFailed:
        raise
    except Exception as e:  # a handler bug must fail this event, not the consumer
        raise EventFailed(m.INTERNAL, f"{event_name} failed: {e!r}") from e
    if not INT32_MIN <= result <= INT32_MAX:
        raise EventFailed(m.OUT_OF_RANGE, f"{event_name}({number}) = {result} does not fit int32")
    return result


@handler("sq")
def sq(n: int) -> int:
    return n * n
