package main

// The few Nimbus messages the load generator needs, encoded and decoded by hand with protowire
// (no protoc codegen), and a gRPC codec that carries them: see protocols/nimbus.proto.

import (
	"errors"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
)

const method = "/nimbus.NimbusService/ProcessEvent"

// ResponseKind values of EventResponse.kind.
const (
	kindResult  = 0
	kindReceipt = 1
	kindError   = 2
	kindGap     = 3
)

// ErrorCode values of EventError.code.
const (
	codeUnknownEvent = 1
	codeOutOfRange   = 2
	codeUnavailable  = 3
)

// request is an EventRequest: an event (name set), an ack (ack set, no name) or a hello (neither).
type request struct {
	name   string
	number int32
	seq    uint64
	ack    uint64
}

func (r *request) appendTo(b []byte) []byte {
	if r.name != "" {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, r.name)
	}
	if r.number != 0 {
		b = protowire.AppendTag(b, 2, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(int64(r.number))) // int32: sign-extended
	}
	if r.seq != 0 {
		b = protowire.AppendTag(b, 10, protowire.VarintType)
		b = protowire.AppendVarint(b, r.seq)
	}
	if r.ack != 0 {
		b = protowire.AppendTag(b, 11, protowire.VarintType)
		b = protowire.AppendVarint(b, r.ack)
	}
	return b
}

// response is the part of an EventResponse the load generator reads (event_name is skipped, and
// the log unless keepLog; errMsg is only kept on an ERROR, where it tells a rate-limit refusal).
type response struct {
	number     int32
	result     int32
	deliveryID uint64
	kind       uint64
	errCode    uint64
	errMsg     string
	seq        uint64
	gapFrom    uint64
	gapTo      uint64

	// Per-stage latency (stages.go). keepLog is set by the receiver before decoding (a sampled
	// result) and kept across decodes, as is log's buffer; sampled and sentAt are set by settle.
	keepLog bool
	log     []byte // keepLog: the bytes of the log (LogEntry, every occurrence, concatenated)
	sampled bool   // the result settled an event whose stages are to be recorded
	sentAt  int64  // that event's send (ns since the run's clock started)
}

var errMalformed = errors.New("malformed EventResponse")

func (r *response) decode(b []byte) error {
	*r = response{keepLog: r.keepLog, log: r.log[:0]}
	var errBytes []byte
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errMalformed
		}
		b = b[n:]
		if typ == protowire.VarintType {
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return errMalformed
			}
			b = b[m:]
			switch num {
			case 2:
				r.number = int32(v)
			case 3:
				r.result = int32(v)
			case 10:
				r.deliveryID = v
			case 11:
				r.kind = v
			case 13:
				r.seq = v
			case 14:
				r.gapFrom = v
			case 15:
				r.gapTo = v
			}
			continue
		}
		if num == 4 && typ == protowire.BytesType && r.keepLog {
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return errMalformed
			}
			// A message field seen twice is merged: for LogEntry (repeated steps only), the
			// concatenation of its occurrences. Copied: gRPC frees b once decoded.
			r.log = append(r.log, v...)
			b = b[m:]
			continue
		}
		if num == 12 && typ == protowire.BytesType {
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return errMalformed
			}
			errBytes = v
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b) // event_name, log (unsampled), anything unknown
		if m < 0 {
			return errMalformed
		}
		b = b[m:]
	}
	if errBytes != nil {
		return r.decodeError(errBytes)
	}
	return nil
}

func (r *response) decodeError(b []byte) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errMalformed
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return errMalformed
			}
			r.errCode = v
			b = b[m:]
		case num == 2 && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return errMalformed
			}
			if r.kind == kindError || r.errMsg == "" {
				r.errMsg = string(v)
			}
			b = b[m:]
		default:
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return errMalformed
			}
			b = b[m:]
		}
	}
	return nil
}

// codec passes the hand-encoded messages through gRPC. Its name is "proto" so the content type
// is application/grpc+proto, which every gRPC server accepts.
type codec struct{}

var _ encoding.CodecV2 = codec{}

func (codec) Name() string { return "proto" }

func (codec) Marshal(v any) (mem.BufferSlice, error) {
	r, ok := v.(*request)
	if !ok {
		return nil, errors.New("codec: not a *request")
	}
	// gRPC keeps the bytes until its writer has put them on the wire, so each message gets its
	// own (small: below gRPC's pooling threshold, so a pool would not be used anyway).
	b := r.appendTo(make([]byte, 0, 32))
	return mem.BufferSlice{mem.SliceBuffer(b)}, nil
}

func (codec) Unmarshal(data mem.BufferSlice, v any) error {
	r, ok := v.(*response)
	if !ok {
		return errors.New("codec: not a *response")
	}
	if len(data) == 1 {
		return r.decode(data[0].ReadOnlyData()) // decoded before gRPC frees it
	}
	return r.decode(data.Materialize())
}
