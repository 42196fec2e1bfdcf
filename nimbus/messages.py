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
ReportItem = pb.ReportItem
DeliveryReport = pb.DeliveryReport

# ResponseKind
RESULT, RECEIPT, ERROR, GAP = pb.RESULT, pb.RECEIPT, pb.ERROR, pb.GAP
# ErrorCode
UNKNOWN_EVENT, OUT_OF_RANGE, UNAVAILABLE, INVALID_ARGUMENT, INTERNAL = (
    pb.UNKNOWN_EVENT, pb.OUT_OF_RANGE, pb.UNAVAILABLE, pb.INVALID_ARGUMENT, pb.INTERNAL,
)
