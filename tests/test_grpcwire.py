"""nimbus.wire.grpc: the versions of grpclib and trio-asyncio it accepts (those its parts were
checked against, the same as pyproject.toml's pins), and client_recv_many against grpclib's
receive buffer: every message once, in order, whatever the DATA frames' boundaries; at most
`limit` per call; a message not all there is left for the next call; the flow-control credit
given back is what arrived."""

from __future__ import annotations

import contextlib
import random
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from grpclib.protocol import Buffer

from nimbus.wire import grpc as grpcwire
from nimbus.wire import trace
from nimbus.wire.messages import EventResponse


@pytest.mark.parametrize(
    "installed",
    [
        {"grpclib": "0.4.7", "trio-asyncio": "0.15.0"},
        {"grpclib": "0.4.9", "trio-asyncio": "0.16.0"},
        {"grpclib": "0.4.9.post1", "trio-asyncio": "0.16.0+dev"},
    ],
)
def test_versions_checked_are_accepted(installed: dict[str, str]) -> None:
    grpcwire.check_versions(installed)


@pytest.mark.parametrize(
    ("installed", "named"),
    [
        ({"grpclib": "0.4.6"}, "grpclib 0.4.6 (checked: >=0.4.7,<0.4.10)"),
        ({"grpclib": "0.4.10"}, "grpclib 0.4.10 (checked: >=0.4.7,<0.4.10)"),
        ({"grpclib": "0.5.0"}, "grpclib 0.5.0"),
        ({"trio-asyncio": "0.17.0"}, "trio-asyncio 0.17.0 (checked: >=0.15,<0.17)"),
        ({"trio-asyncio": "0.14.1"}, "trio-asyncio 0.14.1"),
        ({"grpclib": "1.0"}, "grpclib 1.0"),
    ],
)
def test_versions_not_checked_are_refused(installed: dict[str, str], named: str) -> None:
    with pytest.raises(grpcwire.UnsupportedDependency, match=re.escape(named)):
        grpcwire.check_versions({"grpclib": "0.4.9", "trio-asyncio": "0.16.0", **installed})


def test_the_installed_versions_are_the_ones_imported_and_checked() -> None:
    import grpclib
    import trio_asyncio

    installed = grpcwire.installed_versions()
    assert installed == {"grpclib": grpclib.__version__, "trio-asyncio": trio_asyncio.__version__}
    grpcwire.check_versions(installed)  # what importing nimbus.wire.grpc did


def test_pyproject_pins_the_versions_checked() -> None:
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    pins = {}
    for dep in project["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", dep)
        assert name is not None
        pins[name.group()] = dep[name.end() :].split(";")[0].strip()
    for name, (low, high) in grpcwire.CHECKED.items():
        assert pins[name] == f">={low},<{high}", name


def _messages(n: int) -> list[EventResponse]:
    out = []
    for i in range(1, n + 1):
        r = EventResponse(event_name="sq", number=i, result=i * i, delivery_id=i)
        for _ in range(i % 4):
            trace.step(r.log, "server", "pod-1", "deliver", epoch=i)
        out.append(r)
    return out


class _Call:
    """What client_recv_many uses of a grpclib client Stream: recv_message (one message through
    the same buffer, as grpclib reads it) and the stream's buffer and counters."""

    def __init__(self, buffer: Buffer) -> None:
        self._stream = SimpleNamespace(
            buffer=buffer,
            connection=SimpleNamespace(messages_received=0, last_message_received=0.0),
        )
        self._recv_type = EventResponse
        self._wrapper = contextlib.nullcontext()
        self._messages_received = 0

    async def recv_message(self) -> Any:
        meta = await self._stream.buffer.read(5)
        if not meta:
            return None
        _, size = grpcwire._HEADER.unpack(meta)
        self._messages_received += 1
        return EventResponse.FromString(await self._stream.buffer.read(size))


@pytest.mark.parametrize("seed", range(20))
async def test_every_message_once_in_order_whatever_the_chunking(seed: int) -> None:
    rnd = random.Random(seed)
    msgs = _messages(60)
    data = grpcwire.frame(m.SerializeToString() for m in msgs)
    acked: list[int] = []
    buffer = Buffer(acked.append)
    call = _Call(buffer)
    got: list[EventResponse] = []
    pos = 0
    while pos < len(data) or not buffer._eof:
        # Some bytes arrive (cut anywhere: inside a header, inside a message), then a read.
        if pos < len(data):
            for _ in range(rnd.choice([1, 2, 4])):  # several DATA frames at once, or one
                step = rnd.choice([1, 3, 5, 7, 40, 300, 2000, 20000])
                chunk = data[pos : pos + step]
                if chunk:
                    buffer.add(chunk, len(chunk))
                pos += len(chunk)
        else:
            buffer.eof()
        limit = rnd.choice([1, 2, 32])
        while buffer._acked_size >= 5 or buffer._unacked.qsize():
            if not buffer._acked_size and buffer._unacked.qsize() == 1 and buffer._eof:
                break
            # Only read when a whole message is surely there (recv_message would wait).
            have = buffer._acked_size + sum(len(u.data) for u in list(buffer._unacked._queue))
            if have < 5:
                break
            head = (
                bytes(b"".join(a.data for a in buffer._acked))
                + b"".join(bytes(u.data) for u in list(buffer._unacked._queue))
            )[:5]
            if have < 5 + grpcwire._HEADER.unpack(head)[1]:
                break
            batch = await grpcwire.client_recv_many(call, limit)
            assert 1 <= len(batch) <= limit
            got += batch
    assert got == msgs
    assert sum(acked) == len(data)  # all credit given back, none twice
    assert call._messages_received == len(msgs)
    assert await grpcwire.client_recv_many(call, 32) == []  # and then the end
