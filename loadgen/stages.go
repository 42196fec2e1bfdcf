package main

// Per-stage latency from the trace each RESULT carries (EventResponse.log: a LogEntry whose
// TraceSteps each hop appends, with its wall-clock time; every process is on this machine, so the
// clocks agree). Every --stage-sample'th result of a client is decoded (its receiver keeps the
// log's bytes, see response.keepLog); the time between consecutive steps goes into a histogram
// per stage, named as scripts/load_client.py names them (record_stages) so the reports agree:
//
//	client send -> server/ProcessEvent, server/ProcessEvent -> event-consumer/compute, ...,
//	server/deliver -> client receive, and (inside Nimbus) server/ProcessEvent -> server/deliver.

import (
	"bytes"
	"math"
	"sync"

	"google.golang.org/protobuf/encoding/protowire"
)

// stageMax is how many distinct stages are kept: the names come from the server's trace steps, a
// small set (a stage first seen when that many are kept is left out), so memory stays bounded.
const stageMax = 64

const stageInside = "(inside Nimbus) server/ProcessEvent -> server/deliver"

var (
	stepIn  = []byte("server/ProcessEvent")
	stepOut = []byte("server/deliver")
)

type stageHist struct {
	name string
	h    liveHist
}

// stageSet: the stages seen so far, in the order of their first appearance, one histogram each.
type stageSet struct {
	mu     sync.Mutex
	byName map[string]*stageHist
	order  []*stageHist
}

type traceStep struct {
	start, end int   // its "service/method" in stageScratch.names
	ts         int64 // its wall-clock time, ns since the epoch
}

// stageScratch is one receiver's buffers: once warm, a sampled result allocates nothing.
type stageScratch struct {
	names []byte
	steps []traceStep
	key   []byte
}

// parse reads a LogEntry's steps into sc; false if it is malformed.
func (sc *stageScratch) parse(b []byte) bool {
	sc.names, sc.steps = sc.names[:0], sc.steps[:0]
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, m := protowire.ConsumeBytes(b)
			if m < 0 || !sc.parseStep(v) {
				return false
			}
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return false
		}
		b = b[m:]
	}
	return true
}

// parseStep reads a TraceStep: timestamp (1), service_name (2), method_name (4).
func (sc *stageScratch) parseStep(b []byte) bool {
	var service, method []byte
	var ts int64
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		if typ == protowire.BytesType && (num == 1 || num == 2 || num == 4) {
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return false
			}
			b = b[m:]
			switch num {
			case 1:
				var ok bool
				if ts, ok = parseTimestamp(v); !ok {
					return false
				}
			case 2:
				service = v
			case 4:
				method = v
			}
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return false
		}
		b = b[m:]
	}
	start := len(sc.names)
	sc.names = append(sc.names, service...)
	sc.names = append(sc.names, '/')
	sc.names = append(sc.names, method...)
	sc.steps = append(sc.steps, traceStep{start: start, end: len(sc.names), ts: ts})
	return true
}

// parseTimestamp reads a google.protobuf.Timestamp (seconds = 1, nanos = 2) as ns.
func parseTimestamp(b []byte) (int64, bool) {
	var sec, nanos int64
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, false
		}
		b = b[n:]
		if typ == protowire.VarintType && (num == 1 || num == 2) {
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return 0, false
			}
			b = b[m:]
			if num == 1 {
				sec = int64(v)
			} else {
				nanos = int64(int32(v))
			}
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return 0, false
		}
		b = b[m:]
	}
	return sec*1e9 + nanos, true
}

// record adds one result's stages: log is its LogEntry's bytes, sent and received the event's
// send and the result's arrival on the wall clock (ns since the epoch). A log without steps (or
// malformed) adds nothing.
func (s *stageSet) record(sc *stageScratch, log []byte, sent, received int64) {
	if !sc.parse(log) || len(sc.steps) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	prevName, prev := []byte("client send"), sent
	firstIn, lastOut := -1, -1
	for i, st := range sc.steps {
		name := sc.names[st.start:st.end]
		s.add(sc.stageKey(prevName, name), st.ts-prev)
		prevName, prev = name, st.ts
		if bytes.Equal(name, stepIn) {
			if firstIn < 0 {
				firstIn = i
			}
		} else if bytes.Equal(name, stepOut) {
			lastOut = i
		}
	}
	s.add(sc.stageKey(prevName, []byte("client receive")), received-prev)
	if firstIn >= 0 && lastOut >= 0 {
		// inside Nimbus only: the pod taking the event -> the pod handing its result to the stream
		sc.key = append(sc.key[:0], stageInside...)
		s.add(sc.key, sc.steps[lastOut].ts-sc.steps[firstIn].ts)
	}
}

func (sc *stageScratch) stageKey(from, to []byte) []byte {
	sc.key = append(sc.key[:0], from...)
	sc.key = append(sc.key, " -> "...)
	sc.key = append(sc.key, to...)
	return sc.key
}

// add (s.mu held) puts ns into the stage's histogram; a negative time (clocks) counts as 0.
func (s *stageSet) add(key []byte, ns int64) {
	h := s.byName[string(key)] // no allocation for the lookup
	if h == nil {
		if len(s.order) >= stageMax {
			return
		}
		if s.byName == nil {
			s.byName = map[string]*stageHist{}
		}
		h = &stageHist{name: string(key)}
		s.byName[h.name] = h
		s.order = append(s.order, h)
	}
	h.h.add(ns)
}

// stageOut is one stage of the summary's stages_ms, in ms.
type stageOut struct {
	Stage string  `json:"stage"`
	N     uint64  `json:"n"`
	P50   float64 `json:"p50"`
	P99   float64 `json:"p99"`
}

// summary: every stage in the order first seen (an empty list, not null, if none).
func (s *stageSet) summary() []stageOut {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]stageOut, 0, len(s.order))
	for _, h := range s.order {
		p, n := h.h.quantiles(0.5, 0.99)
		out = append(out, stageOut{Stage: h.name, N: n, P50: p[0], P99: p[1]})
	}
	return out
}

// quantiles reads (without clearing) the histogram's nearest-rank quantiles in ms, each the
// middle of its bucket (exact below 64 µs, within ±1.6% above), and the count.
func (h *liveHist) quantiles(qs ...float64) ([]float64, uint64) {
	var snap [len(liveHist{}.counts)]uint32
	var n uint64
	for i := range h.counts {
		snap[i] = h.counts[i].Load()
		n += uint64(snap[i])
	}
	out := make([]float64, len(qs))
	if n == 0 {
		return out, 0
	}
	for k, q := range qs {
		rank := max(1, uint64(math.Ceil(q*float64(n))))
		var c uint64
		for i, v := range snap {
			c += uint64(v)
			if c >= rank {
				us := histValue(i)
				if i >= 64 {
					us = (us + histValue(i+1)) / 2
				}
				out[k] = float64(us) / 1000
				break
			}
		}
	}
	return out, n
}
