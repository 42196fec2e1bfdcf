package main

import (
	"math"
	"math/bits"
	"slices"
	"sync/atomic"
)

// liveHist is a log-linear histogram of latencies in µs (exact below 64 µs, then 32 sub-buckets
// per power of two: about 3% resolution), filled with atomic adds by every receiver and swapped
// empty by the progress line, which reads its p99. The summary's percentiles are exact (sorted
// per-event values); this is only for the live view.
type liveHist struct {
	counts [64 + 27*32]atomic.Uint32
}

func histIndex(us uint64) int {
	if us < 64 {
		return int(us)
	}
	shift := bits.Len64(us) - 6 // us >> shift is in [32, 63]
	idx := 64 + (shift-1)*32 + int(us>>shift) - 32
	if idx >= 64+27*32 {
		idx = 64 + 27*32 - 1
	}
	return idx
}

func histValue(idx int) uint64 {
	if idx < 64 {
		return uint64(idx)
	}
	shift := (idx-64)/32 + 1
	return uint64((idx-64)%32+32) << shift
}

func (h *liveHist) add(ns int64) {
	if ns < 0 {
		ns = 0
	}
	h.counts[histIndex(uint64(ns/1000))].Add(1)
}

// takeP99 returns the p99 in ms of what was added since the last call (NaN if nothing) and the count.
func (h *liveHist) takeP99() (float64, uint64) {
	var snap [len(liveHist{}.counts)]uint32
	var n uint64
	for i := range h.counts {
		snap[i] = h.counts[i].Swap(0)
		n += uint64(snap[i])
	}
	if n == 0 {
		return math.NaN(), 0
	}
	rank := uint64(math.Ceil(0.99 * float64(n)))
	var c uint64
	for i, v := range snap {
		c += uint64(v)
		if c >= rank {
			return float64(histValue(i)) / 1000, n
		}
	}
	return math.NaN(), n
}

// Percentiles over exact values (ns), sorted in place.
type pct struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p999"`
	Max  float64 `json:"max"`
	N    int     `json:"n"`
}

type pct2 struct {
	P50 float64 `json:"p50"`
	P99 float64 `json:"p99"`
	N   int     `json:"n"`
}

type pctMax struct {
	P50 float64 `json:"p50"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
	N   int     `json:"n"`
}

// quantile: nearest rank on sorted values, in ms (3 decimals).
func quantile(sorted []int64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(q*float64(len(sorted)))) - 1
	rank = max(0, min(rank, len(sorted)-1))
	return ms(sorted[rank])
}

func ms(ns int64) float64 {
	return math.Round(float64(ns)/1e3) / 1e3
}

func percentiles(v []int64) pct {
	slices.Sort(v)
	p := pct{N: len(v)}
	if len(v) == 0 {
		return p
	}
	p.P50 = quantile(v, 0.50)
	p.P90 = quantile(v, 0.90)
	p.P99 = quantile(v, 0.99)
	p.P999 = quantile(v, 0.999)
	p.Max = ms(v[len(v)-1])
	return p
}

func percentiles2(v []int64) pct2 {
	slices.Sort(v)
	return pct2{P50: quantile(v, 0.5), P99: quantile(v, 0.99), N: len(v)}
}

func percentilesMax(v []int64) pctMax {
	slices.Sort(v)
	p := pctMax{N: len(v)}
	if len(v) > 0 {
		p.P50 = quantile(v, 0.5)
		p.P99 = quantile(v, 0.99)
		p.Max = ms(v[len(v)-1])
	}
	return p
}
