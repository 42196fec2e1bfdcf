"""The Nimbus client: a trio library (`open_client`) and the sample CLI (`python -m nimbus.client`).

This package owns the client side of the wire protocol (protocols/nimbus.proto, docs/protocol.md):

- `ClientLedger`: every piece of client bookkeeping, with no I/O (after h11): seq allocation, events
  waiting for a receipt, what to resend after a reconnect, retries of events refused with
  UNAVAILABLE, the delivery-id watermark that drops redeliveries, the delivery id -> seq map, and
  the cumulative ack with its batching rule. Tests drive it directly.
- `NimbusClient` / `open_client`: the I/O around the ledger. One gRPC stream at a time, reconnected
  with jittered exponential backoff (optionally rotating through several pods), results handed to
  the application exactly once and in delivery-id order.
- `main`: the CLI, flag-compatible with the original Go client (`--client_id --start --end`).

Layout: `types` (results, notices, errors, small pure helpers), `ledger` (`ClientLedger`),
`connection` (`NimbusClient`, `ClientOptions`, `open_client`), `runtime` (the state and tasks
`NimbusClient` runs on), `transport` (the asyncio side of a stream, and `check_target`), `cli`
(`main`; `__main__` runs it). Everything public is re-exported here: `from nimbus.client import X`
is the way in.

Protocol 2 (the default) is what makes the delivery contract visible to the application: the
server sends RECEIPT/ERROR per event and a delivery id per result, the client acks cumulatively
and drops redeliveries. Protocol 1 is the original client's behaviour: no extra metadata, no
acks, results as they come.

Delivery guarantees, as seen by the application (protocol 2):
- Every event that `send()` accepted is retransmitted until it is receipted or refused for good
  (UNKNOWN_EVENT, INVALID_ARGUMENT, ...); UNAVAILABLE refusals are retried with backoff. On the
  wire this is at-least-once: if a stream dies after the server durably accepted an event but
  before its RECEIPT reached us, the resend is a second event and the server sends a second
  result for it (another delivery id). A resend keeps its seq and every result carries the seq of
  its event, so the library hands the application the first of them and drops the others
  (`stats.resend_duplicates_dropped`), acking them in order as if taken.
- Each result is handed over once, in strictly increasing delivery-id order; anything at or below
  the highest delivery id already received is a redelivery and is dropped (`stats.duplicates_dropped`).
- The ack covers what the application has *taken* from `results()`/`receive()`, not what is
  buffered inside the library: results buffered when the process dies are redelivered next time.
"""

from nimbus.client.cli import format_result, format_trace, main
from nimbus.client.connection import ClientOptions, NimbusClient, open_client
from nimbus.client.ledger import ClientLedger, OutgoingEvent
from nimbus.client.transport import check_target
from nimbus.client.types import (
    DEFAULT_PORT,
    METHOD,
    PROTOCOL_KEY,
    ClientClosed,
    ClientStats,
    Connected,
    ConnectionFailed,
    Disconnected,
    Gap,
    NimbusError,
    Notice,
    Receipted,
    Refused,
    Result,
    StreamEnd,
    StreamRefused,
    Superseded,
    backoff_delay,
    classify_stream_end,
    describe_error,
    parse_target,
)

__all__ = [
    "DEFAULT_PORT",
    "METHOD",
    "PROTOCOL_KEY",
    "ClientClosed",
    "ClientLedger",
    "ClientOptions",
    "ClientStats",
    "Connected",
    "ConnectionFailed",
    "Disconnected",
    "Gap",
    "NimbusClient",
    "NimbusError",
    "Notice",
    "OutgoingEvent",
    "Receipted",
    "Refused",
    "Result",
    "StreamEnd",
    "StreamRefused",
    "Superseded",
    "backoff_delay",
    "check_target",
    "classify_stream_end",
    "describe_error",
    "format_result",
    "format_trace",
    "main",
    "open_client",
    "parse_target",
]
