package main

import (
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
)

// encStep is a LogEntry holding one TraceStep, as nimbus/wire/trace.py's encoded_step writes it (so
// that logs concatenate), with metadata and an instance id the parser must skip.
func encStep(service, method string, ns int64) []byte {
	var ts []byte
	ts = protowire.AppendTag(ts, 1, protowire.VarintType)
	ts = protowire.AppendVarint(ts, uint64(ns/1e9))
	ts = protowire.AppendTag(ts, 2, protowire.VarintType)
	ts = protowire.AppendVarint(ts, uint64(ns%1e9))
	var st []byte
	st = protowire.AppendTag(st, 1, protowire.BytesType)
	st = protowire.AppendBytes(st, ts)
	st = protowire.AppendTag(st, 2, protowire.BytesType)
	st = protowire.AppendString(st, service)
	st = protowire.AppendTag(st, 3, protowire.BytesType)
	st = protowire.AppendString(st, "instance-1")
	st = protowire.AppendTag(st, 4, protowire.BytesType)
	st = protowire.AppendString(st, method)
	var kv []byte
	kv = protowire.AppendTag(kv, 1, protowire.BytesType)
	kv = protowire.AppendString(kv, "epoch")
	kv = protowire.AppendTag(kv, 2, protowire.BytesType)
	kv = protowire.AppendString(kv, "3")
	st = protowire.AppendTag(st, 6, protowire.BytesType)
	st = protowire.AppendBytes(st, kv)
	var log []byte
	log = protowire.AppendTag(log, 1, protowire.BytesType)
	return protowire.AppendBytes(log, st)
}

func TestStagesFromALiveTrace(t *testing.T) {
	const base = int64(1_780_000_000) * 1e9
	// The log arrives in two occurrences of field 4 (the pod appends its step to the router's
	// encoded log): the decoder must keep both.
	part1 := append(encStep("server", "ProcessEvent", base+1_000_000), encStep("event-consumer", "compute", base+3_000_000)...)
	part2 := append(encStep("result-router", "route", base+3_500_000), encStep("server", "deliver", base+4_000_000)...)
	var msg []byte
	msg = protowire.AppendTag(msg, 2, protowire.VarintType)
	msg = protowire.AppendVarint(msg, 7)
	msg = protowire.AppendTag(msg, 4, protowire.BytesType)
	msg = protowire.AppendBytes(msg, part1)
	msg = protowire.AppendTag(msg, 3, protowire.VarintType)
	msg = protowire.AppendVarint(msg, 49)
	msg = protowire.AppendTag(msg, 4, protowire.BytesType)
	msg = protowire.AppendBytes(msg, part2)

	var resp response
	if err := resp.decode(msg); err != nil || len(resp.log) != 0 || resp.result != 49 {
		t.Fatalf("unsampled: err %v, log %d bytes, result %d", err, len(resp.log), resp.result)
	}
	resp.keepLog = true
	if err := resp.decode(msg); err != nil || resp.number != 7 || resp.result != 49 {
		t.Fatalf("sampled: err %v, %+v", err, resp)
	}
	var s stageSet
	var sc stageScratch
	s.record(&sc, resp.log, base, base+4_250_000)
	want := []stageOut{
		{"client send -> server/ProcessEvent", 1, 1, 1},
		{"server/ProcessEvent -> event-consumer/compute", 1, 2, 2},
		{"event-consumer/compute -> result-router/route", 1, 0.5, 0.5},
		{"result-router/route -> server/deliver", 1, 0.5, 0.5},
		{"server/deliver -> client receive", 1, 0.25, 0.25},
		{stageInside, 1, 3, 3},
	}
	got := s.summary()
	if len(got) != len(want) {
		t.Fatalf("stages: %+v", got)
	}
	for i := range want {
		g, w := got[i], want[i]
		// the histogram's buckets: within 2% of the value
		if g.Stage != w.Stage || g.N != w.N || g.P50 < w.P50*0.98 || g.P50 > w.P50*1.02 || g.P99 != g.P50 {
			t.Errorf("stage %d: got %+v, want %+v", i, g, w)
		}
	}
	// a trace without steps adds nothing; a malformed one neither
	s.record(&sc, nil, base, base+1)
	s.record(&sc, []byte{0x0a, 0x05, 0x01}, base, base+1)
	if got := s.summary(); len(got) != len(want) || got[0].N != 1 {
		t.Fatalf("after empty and malformed: %+v", got)
	}
}

func TestStageSampleAllocatesNothingOnceWarm(t *testing.T) {
	log := append(encStep("server", "ProcessEvent", 2e9), encStep("server", "deliver", 3e9)...)
	var s stageSet
	var sc stageScratch
	s.record(&sc, log, 1e9, 4e9)
	if n := testing.AllocsPerRun(100, func() { s.record(&sc, log, 1e9, 4e9) }); n != 0 {
		t.Errorf("%g allocations per sampled result", n)
	}
}
