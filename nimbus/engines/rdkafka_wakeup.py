"""Waking trio from librdkafka's queues, without a thread (the librdkafka adapter,
nimbus.engines.rdkafka).

librdkafka can write a byte to a file descriptor when one of its queues gets an item after it
was last served (rd_kafka_queue_io_event_enable): a consumer's queue (records, rebalances,
commit answers, errors) or a producer's main queue (delivery reports). trio then waits for
the pipe like for a socket and serves the queue from its own thread with calls that never
block (`consume(n, 0)`, `poll(0)`): no thread hand-off, no GIL hand-over, no trio-token wake
per poll. confluent-kafka does not wrap that call, so it is made through ctypes, on the
rd_kafka_t pointer that confluent-kafka keeps right after the object's header (checked: the
handle's name must be the one this client was given, else the thread path is used).
NIMBUS_RDKAFKA_FD_WAKEUP=0 turns it off (the thread path: a worker thread waits in poll())."""

from __future__ import annotations

import ctypes
import glob
import os
from typing import Any

import confluent_kafka
import trio
from confluent_kafka import Consumer, Producer
from loguru import logger

_FD_WAKEUP = os.environ.get("NIMBUS_RDKAFKA_FD_WAKEUP", "1").strip() not in ("0", "false", "no")


# confluent-kafka releases whose object layout (the `rd_kafka_t *` right after the header) this
# was tested with; another release takes the thread path rather than read an unknown layout.
_FD_TESTED_RELEASES = ("2.16.",)


def _release() -> str:
    """confluent-kafka's release, e.g. "2.16.2" (its version() is that string; older releases
    returned a (string, int) tuple)."""
    v: Any = confluent_kafka.version()
    return str(v[0] if isinstance(v, tuple) else v)


def _load_librdkafka() -> ctypes.CDLL | None:
    """The librdkafka that confluent-kafka's extension is linked with (its wheel bundles one),
    with the few functions used here typed; None if it cannot be found, is another version, or
    confluent-kafka is a release this was not tested with."""
    if not _release().startswith(_FD_TESTED_RELEASES):
        return None
    here = os.path.dirname(confluent_kafka.__file__)
    paths = sorted(glob.glob(os.path.join(here, "..", "confluent_kafka.libs", "librdkafka*.so*")))
    try:
        lib = ctypes.CDLL(paths[0]) if paths else ctypes.CDLL("librdkafka.so.1")
        lib.rd_kafka_version.restype = ctypes.c_int
        if lib.rd_kafka_version() != confluent_kafka.libversion()[1]:
            return None
        lib.rd_kafka_name.restype = ctypes.c_char_p
        lib.rd_kafka_name.argtypes = [ctypes.c_void_p]
        for name in ("rd_kafka_queue_get_consumer", "rd_kafka_queue_get_main"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_void_p
            fn.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_queue_destroy.restype = None
        lib.rd_kafka_queue_destroy.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_queue_io_event_enable.restype = None
        lib.rd_kafka_queue_io_event_enable.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
    except (OSError, AttributeError):
        return None
    return lib


_LIB: ctypes.CDLL | None | bool = False  # not looked for yet
_WAKE_BYTE = ctypes.create_string_buffer(b"!", 1)  # what librdkafka writes (kept alive here)


def _lib() -> ctypes.CDLL | None:
    global _LIB
    if _LIB is False:
        _LIB = _load_librdkafka() if _FD_WAKEUP else None
        if _FD_WAKEUP and _LIB is None:
            logger.info(
                "librdkafka: no io-event wake-ups (confluent-kafka {} untested, or its library"
                " not found); threads wait instead",
                _release(),
            )
    return _LIB  # type: ignore[return-value]


class _QueueFd:
    """A pipe librdkafka writes to when a queue of `handle` gets an item: `main` (a producer's
    delivery reports) or the consumer queue. `close()` before the handle's own close."""

    __slots__ = ("_lib", "_q", "r", "w")

    def __init__(self, lib: ctypes.CDLL, q: int) -> None:
        self._lib = lib
        self._q: int | None = q
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        lib.rd_kafka_queue_io_event_enable(q, self.w, ctypes.addressof(_WAKE_BYTE), 1)

    @classmethod
    def open(cls, handle: Consumer | Producer, client_id: str, kind: str) -> _QueueFd | None:
        lib = _lib()
        if lib is None:
            return None
        # confluent-kafka's Handle: PyObject_HEAD, then `rd_kafka_t *rk`.
        rk = ctypes.c_void_p.from_address(id(handle) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
        name = lib.rd_kafka_name(rk) if rk else None
        role = "consumer" if isinstance(handle, Consumer) else "producer"
        if not name or not name.decode(errors="replace").startswith(f"{client_id}#{role}-"):
            logger.warning("librdkafka: {} handle not recognised; threads wait instead", role)
            return None
        get = lib.rd_kafka_queue_get_main if kind == "main" else lib.rd_kafka_queue_get_consumer
        q = get(rk)
        return cls(lib, q) if q else None

    def drain(self) -> None:
        try:
            while len(os.read(self.r, 512)) == 512:
                pass
        except BlockingIOError:
            pass

    async def wait(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(self.r)

    def close(self) -> None:
        """No more wake-ups (librdkafka's queue lock makes this wait for a write in flight),
        then the queue reference and the pipe go; idempotent."""
        if self._q is None:
            return
        q, self._q = self._q, None
        self._lib.rd_kafka_queue_io_event_enable(q, -1, None, 0)
        self._lib.rd_kafka_queue_destroy(q)
        for fd in (self.r, self.w):
            try:
                trio.lowlevel.notify_closing(fd)
            except RuntimeError:  # not in trio (a thread's close)
                pass
            os.close(fd)
