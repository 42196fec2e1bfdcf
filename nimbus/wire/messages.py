"""The message classes the server side uses: protobuf's (upb) runtime classes generated from
protocols/nimbus.proto into nimbus/proto_gen/nimbus_pb2.py.

Both generated forms describe the same wire format. betterproto's classes
(`nimbus.proto_gen.nimbus`) are the client library's API; the processes use these on every hot
path because they are measured ~400x cheaper here: a 23-byte result costs ~190 µs to encode and
~140 µs to decode with betterproto 2.0.0b7, against 0.5 µs and 1 µs with upb (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from nimbus.proto_gen import nimbus_pb2 as pb

EventRequest = pb.EventRequest
EventResponse = pb.EventResponse
EventError = pb.EventError
LogEntry = pb.LogEntry
KafkaEventRequest = pb.KafkaEventRequest
KafkaEventResponse = pb.KafkaEventResponse
Delivery = pb.Delivery
PodMessage = pb.PodMessage
ResultPack = pb.ResultPack
ReportItem = pb.ReportItem
DeliveryReport = pb.DeliveryReport

# ResponseKind
RESULT, RECEIPT, ERROR, GAP = pb.RESULT, pb.RECEIPT, pb.ERROR, pb.GAP
# ErrorCode
UNKNOWN_EVENT, OUT_OF_RANGE, UNAVAILABLE, INVALID_ARGUMENT, INTERNAL = (
    pb.UNKNOWN_EVENT,
    pb.OUT_OF_RANGE,
    pb.UNAVAILABLE,
    pb.INVALID_ARGUMENT,
    pb.INTERNAL,
)


# -- composing messages on the wire (nimbus.wire.pod_channel.pod_messages, nimbus.doorman.pod) -----------------
# A hot path may write a message as the concatenation of its parts' encodings: a parser reads
# fields in any order, concatenates repeated fields, and (unused here) merges a singular message
# field met twice. Tag bytes (field number << 3 | 2: length-delimited) of the fields composed so:
POD_REPLY_TO, POD_DELIVERY = 0x0A, 0x12  # PodMessage.reply_to = 1, deliveries = 2
DELIVERY_RESPONSE = 0x2A  # Delivery.response = 5
RESPONSE_LOG = 0x22  # EventResponse.log = 4


def varint(n: int) -> bytes:
    """A non-negative integer in protobuf's varint encoding."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte (one of the above), the varint length, payload."""
    n = len(payload)
    if n < 0x80:
        return bytes((tag, n)) + payload
    return bytes((tag,)) + varint(n) + payload


def response_with_log(head: bytes, log: bytes) -> bytes:
    """An encoded EventResponse: `head` (its fields but the log, encoded) and its log's bytes."""
    return head + length_delimited(RESPONSE_LOG, log)
