package main

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	ackEvery     = 100                    // results between acks at most
	ackDelay     = 5 * time.Millisecond   // an ack waits this long at most
	closeWait    = 3 * time.Second        // for the server to end a half-closed stream
	retryBackoff = 100 * time.Millisecond // before resending an event refused by the rate limit
	reopenDelay  = 200 * time.Millisecond // before reopening a stream that failed
)

var streamDesc = grpc.StreamDesc{StreamName: "ProcessEvent", ClientStreams: true, ServerStreams: true}

// event flags
const (
	fRefused uint8 = 1 << iota // refused for good (an ERROR other than the rate limit)
	fPreCut                    // sent before the reconnect cut, without a result then: the backlog
	fResent                    // transmitted again on a new stream (its receipt may have died)
	fWrong                     // its result did not match (number or square)
	fLate                      // transmitted later than its sent time (a retry, or held for a stream)
)

// event is one logical event of a client (a refused-and-retried event keeps its slot and gets
// a new seq). Times are ns since the run's clock started.
type event struct {
	sched   int64 // when it was due (latency is measured from here)
	sent    int64 // when it was first handed to a stream
	receipt int64
	result  int64 // first result
	retryAt int64 // >0: refused by the rate limit, to be resent with a new seq at this time
	seq     uint64
	did     uint64 // delivery id of its first result
	number  int32
	flags   uint8
}

type stream struct {
	c      *client
	target int
	conn   *conn
	cs     grpc.ClientStream
	cancel context.CancelFunc
	opened int64
	done   chan struct{} // closed when its receiver has returned

	sendMu     sync.Mutex
	sendClosed bool // sendMu: CloseSend done
	dead       bool // sendMu: cut or failed; nothing more is sent on it

	// c.mu:
	broken      bool // its receiver saw the stream end
	ours        bool // we ended it (cut, close timeout): its status is not an error
	firstResult int64
	fifo        []int32 // protocol 1: events sent on it, awaiting their results in order
	fifoHead    int
}

type client struct {
	r      *runner
	i      int
	id     string
	md     metadata.MD
	phase  int64
	rng    *rand.Rand
	conns  map[int]*conn // per-client connections (unless shared); opener's
	wake   chan struct{} // event mode: a poke
	poked  atomic.Bool   // tick mode: a poke, seen by the poller's next tick
	wakeAt int64         // when step wants to run again (-1: only if poked); its driver's
	done   bool          // the driver's: step said finished

	// step's own (only the driver's goroutine runs step)
	j        int64 // next event of the schedule
	batch    []int32
	reqs     []request
	reopenAt int64
	deadline int64 // once sending stopped: when to give up waiting for results

	mu          sync.Mutex
	st          *stream
	opening     bool // a stream is being opened (asynchronously)
	target      int
	events      []event
	bySeq       []int32 // seq-1 -> index in events
	nextSeq     uint64
	resultMsgs  int64    // RESULTs received (with --stage-sample: every Nth has its stages decoded)
	highest     uint64   // dedupe watermark: highest delivery id received
	seen        []uint64 // delivery ids received, increasing (to tell a repeat from a reordering)
	ackSent     uint64
	unacked     int     // results since the last ack
	ackAt       int64   // when the next ack is due (unacked > 0)
	outstanding int     // sent, no result, not refused for good
	retryQ      []int32 // events waiting to be resent after a rate-limit refusal
	orphans     []int32 // protocol 1: unanswered events of earlier streams
	unsent1     []int32 // protocol 1: events created while no stream was up
	sending     bool
	aborted     bool
	halfClosed  *stream // the stream we half-closed (close)

	// counters (c.mu)
	sent, receipted, results, dupDropped, appDup, resendDup, outOfOrder   int
	refused, refusedFinal, retried, gaps, resent, wrong, unmatched        int
	resultErrors, resultBeforeReceipt, streamsOpened, closeTimeouts, cuts int
	streamErrors                                                          map[string]int
	firstSend, lastSend, lastResult, maxLag, sendEnd                      int64

	// reconnect scenario
	cutAt          int64 // when to cut (0: never)
	cutDone        bool
	cutStream      *stream // the stream opened right after the cut
	reconnFirst    int64   // its open -> its first RESULT (ns, -1 none)
	backlog        int     // events in doubt at the cut
	backlogResults int
	backlogLast    int64
}

// poke has step run soon: at once (event mode) or on the next tick (tick mode).
func (c *client) poke() {
	if c.r.poll != nil {
		c.poked.Store(true)
		return
	}
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *client) conn(target int) (*conn, error) {
	if c.r.shared != nil {
		pool := c.r.shared[target]
		return pool[(c.i/len(c.r.shared))%len(pool)], nil
	}
	if cc := c.conns[target]; cc != nil {
		return cc, nil
	}
	cc, err := c.r.dial(c.r.cfg.targets[target])
	if err != nil {
		return nil, err
	}
	c.conns[target] = cc
	return cc, nil
}

// startOpen opens a stream on target in the background (a new connection needs the poller's
// ticks to complete, so the driver must not wait for it); step is poked when it is up or failed.
func (c *client) startOpen(target int) {
	c.mu.Lock()
	c.opening = true
	c.target = target
	c.mu.Unlock()
	go func() {
		err := c.open(target)
		c.mu.Lock()
		c.opening = false
		if err != nil {
			c.streamErrors["OPEN:"+status.Code(err).String()]++
		}
		c.mu.Unlock()
		c.poke()
	}()
}

// open starts a stream on target and makes it the client's current one: c.st is set before its
// receiver starts, so nothing the server sends first (a replay) is missed, and while its sendMu
// is held, so the hello, the last ack again (it may have died with the old stream) and every
// event without receipt or result (protocol 2, in seq order) go first on it.
func (c *client) open(target int) error {
	cc, err := c.conn(target)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(metadata.NewOutgoingContext(c.r.ctx, c.md))
	cs, err := cc.cc.NewStream(ctx, &streamDesc, method)
	if err != nil {
		cancel()
		return err
	}
	st := &stream{c: c, target: target, conn: cc, cs: cs, cancel: cancel, done: make(chan struct{})}
	var reqs []request
	st.sendMu.Lock()
	defer st.sendMu.Unlock()
	c.mu.Lock()
	st.opened = c.r.now()
	c.st = st
	c.streamsOpened++
	if c.r.cfg.protocol == 2 {
		reqs = append(reqs, request{}) // the hello
		if c.highest > 0 {
			reqs = append(reqs, request{ack: c.highest})
			c.ackSent = max(c.ackSent, c.highest)
			c.unacked = 0
		}
		for s, idx := range c.bySeq {
			ev := &c.events[idx]
			if ev.seq != uint64(s+1) || ev.receipt != 0 || ev.result != 0 || ev.flags&fRefused != 0 || ev.retryAt != 0 {
				continue
			}
			ev.flags |= fResent
			c.resent++
			reqs = append(reqs, request{name: "sq", number: ev.number, seq: ev.seq})
		}
	} else {
		for _, idx := range c.unsent1 {
			ev := &c.events[idx]
			reqs = append(reqs, request{name: "sq", number: ev.number})
		}
		st.fifo = append(st.fifo, c.unsent1...)
		c.unsent1 = nil
	}
	if c.cutDone && c.cutStream == nil {
		c.cutStream = st
	}
	c.mu.Unlock()
	go st.receive()
	for k := range reqs {
		if cs.SendMsg(&reqs[k]) != nil {
			break // the receiver sees why
		}
	}
	return nil
}

func (c *client) wireSeq(seq uint64) uint64 {
	if c.r.cfg.protocol == 1 {
		return 0
	}
	return seq
}

// kill ends a stream abruptly (no final ack): the reconnect scenario's cut.
func (st *stream) kill() {
	st.sendMu.Lock()
	st.dead = true
	st.sendMu.Unlock()
	st.cancel()
}

// receive reads the stream until it ends; each response is applied under c.mu, unless the stream
// is no longer the client's current one (cut: whatever it still had comes again on the next).
func (st *stream) receive() {
	c := st.c
	r := c.r
	p1 := r.cfg.protocol == 1
	sample := int64(r.cfg.stageSample)
	var resp response
	var sc stageScratch
	defer close(st.done)
	c.mu.Lock()
	resp.keepLog = sample > 0 && (c.resultMsgs+1)%sample == 0
	c.mu.Unlock()
	for {
		err := st.cs.RecvMsg(&resp)
		now := st.arrival(r.now())
		if err != nil {
			st.ended(err)
			return
		}
		c.mu.Lock()
		if c.st != st {
			c.mu.Unlock()
			continue
		}
		if sample > 0 && (p1 || resp.kind == kindResult) {
			c.resultMsgs++
		}
		if p1 {
			c.onResult1(st, &resp, now)
		} else {
			switch resp.kind {
			case kindResult:
				c.onResult(st, &resp, now)
			case kindReceipt:
				c.onReceipt(&resp, now)
			case kindError:
				c.onError(&resp, now)
			case kindGap:
				c.gaps++
				c.advance(resp.deliveryID, now)
			default:
				c.unmatched++
			}
		}
		// the next RESULT is a sampled one: its log is kept when it is decoded
		resp.keepLog = sample > 0 && (c.resultMsgs+1)%sample == 0
		c.mu.Unlock()
		if resp.sampled {
			r.stages.record(&sc, resp.log, r.t0Real+resp.sentAt, r.t0Real+now)
		}
	}
}

// arrival is when the message just received reached this machine: in tick mode the kernel's
// timestamp of the last read on the stream's socket (the read that brought the message, or a
// later one: never earlier), else now.
func (st *stream) arrival(now int64) int64 {
	if pc := st.conn.pc.Load(); pc != nil {
		if ts := pc.stamp.Load(); ts != 0 {
			if a := ts - st.c.r.t0Real; a > 0 && a < now {
				return a
			}
		}
	}
	return now
}

func (st *stream) ended(err error) {
	c := st.c
	code := codes.OK
	if !errors.Is(err, io.EOF) {
		code = status.Code(err)
	}
	c.mu.Lock()
	st.broken = true
	current := c.st == st
	if current && !st.ours {
		if code != codes.OK || !st.sendClosedLocked() {
			name := code.String()
			if code == codes.OK {
				name = "OK_UNEXPECTED" // the server ended it before we half-closed
			}
			c.streamErrors[name]++
		}
		if code == codes.Aborted { // superseded: a newer stream of this client exists
			c.aborted = true
		}
		if c.r.cfg.protocol == 1 {
			c.orphans = append(c.orphans, st.fifo[st.fifoHead:]...)
			st.fifo, st.fifoHead = nil, 0
		}
	}
	c.mu.Unlock()
	st.sendMu.Lock()
	st.dead = true
	st.sendMu.Unlock()
	c.poke()
}

// sendClosedLocked: whether we half-closed st (c.mu held; sendClosed itself is sendMu's).
func (st *stream) sendClosedLocked() bool { return st.c.halfClosed == st }

func (c *client) lookup(seq uint64) *event {
	if idx := c.lookupIdx(seq); idx >= 0 {
		return &c.events[idx]
	}
	return nil
}

func (c *client) lookupIdx(seq uint64) int32 {
	if seq == 0 || seq > uint64(len(c.bySeq)) {
		return -1
	}
	idx := c.bySeq[seq-1]
	if c.events[idx].seq != seq {
		return -1 // an older seq of a retried event
	}
	return idx
}

func (c *client) onReceipt(resp *response, now int64) {
	ev := c.lookup(resp.seq)
	if ev == nil {
		c.unmatched++
		return
	}
	if ev.receipt == 0 {
		ev.receipt = now
		c.receipted++
	}
}

func (c *client) onError(resp *response, now int64) {
	c.refused++
	idx := c.lookupIdx(resp.seq)
	if idx < 0 {
		return
	}
	ev := &c.events[idx]
	if ev.result != 0 || ev.flags&fRefused != 0 || ev.retryAt != 0 {
		return
	}
	if resp.errCode == codeUnavailable {
		// the per-client rate limit: resend later with a new seq
		ev.retryAt = now + int64(retryBackoff) + c.rng.Int64N(int64(retryBackoff))
		c.retryQ = append(c.retryQ, idx)
		c.retried++
		c.poke()
		return
	}
	ev.flags |= fRefused
	c.refusedFinal++
	c.outstanding--
	if c.outstanding == 0 || !c.r.paced {
		c.poke()
	}
}

// advance moves the ack watermark to id (a new result or a GAP) and has the sender ack it: within
// ackDelay, or at once after ackEvery results.
func (c *client) advance(id uint64, now int64) {
	if id <= c.highest {
		return
	}
	c.highest = id
	c.unacked++
	switch c.unacked {
	case 1:
		c.ackAt = now + int64(ackDelay)
		c.poke()
	case ackEvery:
		c.ackAt = now
		c.poke()
	}
}

func (c *client) onResult(st *stream, resp *response, now int64) {
	if st.firstResult == 0 {
		st.firstResult = now
		if st == c.cutStream {
			c.reconnFirst = now - st.opened
		}
	}
	d := resp.deliveryID
	if resp.errCode != 0 {
		c.resultErrors++
	}
	if d <= c.highest {
		if _, found := slices.BinarySearch(c.seen, d); found {
			c.dupDropped++ // a redelivery: dropped
			return
		}
		// A new id below the watermark: the results are out of order (a client acking
		// cumulatively would have dropped it). Counted; the event still gets its result.
		c.outOfOrder++
		if ev := c.lookup(resp.seq); ev != nil && ev.result == 0 {
			c.settle(ev, resp, d, now)
		}
		return
	}
	c.seen = append(c.seen, d)
	ev := c.lookup(resp.seq)
	switch {
	case ev == nil:
		c.unmatched++
	case ev.result != 0:
		c.appDup++ // a second result of one event, with a new delivery id
		if ev.flags&fResent != 0 {
			c.resendDup++
		}
	default:
		c.settle(ev, resp, d, now)
	}
	c.advance(d, now)
}

func (c *client) settle(ev *event, resp *response, d uint64, now int64) {
	ev.result = now
	ev.did = d
	c.results++
	c.lastResult = now
	if ev.receipt == 0 {
		c.resultBeforeReceipt++
	}
	if resp.number != ev.number || resp.result != ev.number*ev.number {
		ev.flags |= fWrong
		c.wrong++
	}
	if ev.sched >= c.r.warmupEnd {
		c.r.live.add(now - ev.sched)
		// a sampled result's stages, if its event went out once, at its sent time
		if resp.keepLog && ev.flags&(fResent|fLate) == 0 {
			resp.sampled, resp.sentAt = true, ev.sent
		}
	}
	if ev.flags&fPreCut != 0 {
		c.backlogResults++
		c.backlogLast = now
	}
	if ev.retryAt != 0 {
		ev.retryAt = 0 // a result after all (cannot happen for a refused seq, but be safe)
	}
	c.outstanding--
	if c.outstanding == 0 || !c.r.paced {
		c.poke()
	}
}

// onResult1: protocol 1 has no ids: results come in the order the events were sent on the stream.
func (c *client) onResult1(st *stream, resp *response, now int64) {
	if st.firstResult == 0 {
		st.firstResult = now
	}
	if resp.errCode != 0 {
		c.resultErrors++
	}
	if st.fifoHead < len(st.fifo) {
		ev := &c.events[st.fifo[st.fifoHead]]
		if ev.number == resp.number || len(c.orphans) == 0 {
			st.fifoHead++
			if st.fifoHead == len(st.fifo) {
				st.fifo, st.fifoHead = st.fifo[:0], 0
			}
			c.settle(ev, resp, 0, now)
			return
		}
	}
	// After a failed stream: a result of an event of an earlier stream (its backlog), by number.
	for k, idx := range c.orphans {
		ev := &c.events[idx]
		if ev.number == resp.number && ev.result == 0 {
			c.orphans = slices.Delete(c.orphans, k, k+1)
			c.settle(ev, resp, 0, now)
			return
		}
	}
	c.unmatched++
}

// newEvent creates the next event (c.mu held), due at sched, handed over now.
func (c *client) newEvent(sched, now int64) int32 {
	idx := int32(len(c.events))
	c.nextSeq++
	seq := c.nextSeq
	// |number| <= 46340 so that its square fits an int32; varied so results are checkable
	n := int32((seq*2654435761)%92681) - 46340
	c.events = append(c.events, event{sched: sched, sent: now, seq: seq, number: n})
	c.bySeq = append(c.bySeq, idx)
	c.sent++
	c.outstanding++
	if c.firstSend == 0 {
		c.firstSend = now
	}
	c.lastSend = now
	if lag := now - sched; lag > c.maxLag {
		c.maxLag = lag
	}
	return idx
}

// step does what is due at now: the reconnect scenario's cut, reopening a failed stream, the
// batched ack, the events due (or, unpaced, what the window allows), retries of refused events.
// It returns when it wants to run again (-1: only when poked) and whether the client is done
// (sending over and every event settled, or the timeout passed): then the driver closes it.
func (c *client) step(now int64) (int64, bool) {
	r := c.r
	cfg := r.cfg
	c.mu.Lock()
	if c.aborted {
		c.mu.Unlock()
		return -1, true
	}
	if c.opening {
		c.mu.Unlock()
		return -1, false // poked when it is up
	}
	// the reconnect scenario's cut, once this step's events are on their way (so some are in
	// flight at the cut)
	cut := c.cutAt > 0 && !c.cutDone && now >= c.cutAt && c.st != nil && !c.st.broken
	// a failed stream (or one that could not be opened): reopen on the next target after a pause
	if c.st == nil || c.st.broken {
		if c.reopenAt == 0 {
			c.reopenAt = now + int64(reopenDelay)
		}
		if now >= c.reopenAt && (c.deadline == 0 || now < c.deadline) {
			next := (c.target + 1) % len(cfg.targets)
			c.mu.Unlock()
			c.reopenAt = 0
			c.startOpen(next)
			return -1, false
		}
	}
	st := c.st
	up := st != nil && !st.broken
	batch := c.batch[:0]
	reqs := c.reqs[:0]
	// the batched ack
	if up && cfg.protocol == 2 && c.unacked > 0 && now >= c.ackAt {
		if c.highest > c.ackSent {
			c.ackSent = c.highest
			reqs = append(reqs, request{ack: c.highest})
		}
		c.unacked = 0
	}
	// due events
	if c.sending {
		if r.paced {
			for c.j < r.perClient && c.phase+c.j*r.interval <= r.sendFor {
				sched := r.grid(r.schedStart + c.phase + c.j*r.interval)
				if sched > now {
					break
				}
				batch = append(batch, c.newEvent(sched, now))
				c.j++
			}
		} else {
			// (protocol 1: events of a failed stream wait for a result as backlog, outside the window)
			for c.outstanding-len(c.orphans) < cfg.window && c.j < r.perClient && now-r.schedStart <= r.sendFor {
				batch = append(batch, c.newEvent(now, now))
				c.j++
			}
		}
		if c.j >= r.perClient || (r.paced && c.phase+c.j*r.interval > r.sendFor) ||
			(!r.paced && now-r.schedStart > r.sendFor) || r.stopped() {
			c.sending = false
			c.sendEnd = now
			c.deadline = now + int64(cfg.timeout*1e9)
		}
	}
	// due retries of events the rate limit refused (new seqs)
	var nextRetry int64
	if len(c.retryQ) > 0 {
		keep := c.retryQ[:0]
		for _, idx := range c.retryQ {
			ev := &c.events[idx]
			if ev.retryAt == 0 || ev.result != 0 {
				continue
			}
			if ev.retryAt <= now {
				ev.retryAt = 0
				ev.flags |= fLate
				c.nextSeq++
				ev.seq = c.nextSeq
				c.bySeq = append(c.bySeq, idx)
				batch = append(batch, idx)
				continue
			}
			if nextRetry == 0 || ev.retryAt < nextRetry {
				nextRetry = ev.retryAt
			}
			keep = append(keep, idx)
		}
		c.retryQ = keep
	}
	if len(batch) > 0 {
		if cfg.protocol == 1 {
			if up {
				st.fifo = append(st.fifo, batch...)
			} else {
				c.unsent1 = append(c.unsent1, batch...)
				for _, idx := range batch {
					c.events[idx].flags |= fLate
				}
			}
		}
		if up { // else they go on the next stream
			for _, idx := range batch {
				ev := &c.events[idx]
				reqs = append(reqs, request{name: "sq", number: ev.number, seq: c.wireSeq(ev.seq)})
			}
		}
	}
	settled := c.outstanding == 0 && len(c.retryQ) == 0
	ackAt := int64(0)
	if c.unacked > 0 {
		ackAt = c.ackAt
	}
	sending := c.sending
	c.mu.Unlock()
	c.batch, c.reqs = batch, reqs
	if len(reqs) > 0 {
		st.sendMu.Lock()
		if !st.dead {
			for k := range reqs {
				if st.cs.SendMsg(&reqs[k]) != nil {
					break // the receiver sees why; the events are resent on the next stream
				}
			}
		}
		st.sendMu.Unlock()
	}
	if cut {
		c.cut(st)
		return -1, false
	}
	if !sending && (settled || now >= c.deadline) {
		return -1, true
	}
	// when to run again
	wakeAt := int64(-1)
	at := func(t int64) {
		if t > 0 && (wakeAt < 0 || t < wakeAt) {
			wakeAt = t
		}
	}
	if sending && r.paced {
		at(r.grid(r.schedStart + c.phase + c.j*r.interval))
	}
	if sending && !r.paced {
		at(r.schedStart + r.sendFor + 1)
	}
	at(nextRetry)
	if up {
		at(ackAt)
	} else {
		at(max(c.reopenAt, now+1))
	}
	if c.cutAt > 0 && !c.cutDone {
		at(c.cutAt)
	}
	if !sending {
		at(c.deadline)
	}
	return wakeAt, false
}

// cut ends st abruptly (cancelled: no final ack, no half-close) and opens a stream on the next
// target. Every event without a result then is the backlog, whose results are timed.
func (c *client) cut(st *stream) {
	c.mu.Lock()
	c.cutDone = true
	c.cuts++
	st.ours = true
	c.st = nil
	for k := range c.events {
		ev := &c.events[k]
		if ev.result == 0 && ev.flags&fRefused == 0 {
			ev.flags |= fPreCut
			c.backlog++
		}
	}
	c.mu.Unlock()
	st.kill()
	c.startOpen((st.target + 1) % len(c.r.cfg.targets))
}

// run drives one client in event mode: step, then sleep on a timer of its own until the time it
// asked for or a poke.
func (c *client) run(wg *sync.WaitGroup) {
	r := c.r
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		wakeAt, done := c.step(r.now())
		if done {
			break
		}
		d := time.Duration(1 << 62)
		if wakeAt >= 0 {
			d = time.Duration(wakeAt - r.now())
			if d <= 0 {
				continue
			}
		}
		timer.Reset(d)
		select {
		case <-timer.C:
		case <-c.wake:
			timer.Stop()
		case <-r.stopCh:
			timer.Stop()
		}
	}
	c.finish(wg)
}

// finish closes the stream cleanly and the client's own connections.
func (c *client) finish(wg *sync.WaitGroup) {
	defer wg.Done()
	c.close()
	for _, cc := range c.conns {
		_ = cc.cc.Close()
	}
}

// close ends the stream cleanly: the final ack, half-close, then the server ends the stream
// (OK once everything written is acked); cancelled if that takes longer than closeWait.
func (c *client) close() {
	c.mu.Lock()
	st := c.st
	c.mu.Unlock()
	if st == nil {
		return
	}
	st.sendMu.Lock()
	if !st.dead && !st.sendClosed {
		if c.r.cfg.protocol == 2 {
			c.mu.Lock()
			a := c.highest
			send := a > c.ackSent
			c.ackSent = max(c.ackSent, a)
			c.unacked = 0
			c.mu.Unlock()
			if send {
				_ = st.cs.SendMsg(&request{ack: a})
			}
		}
		st.sendClosed = true
		c.mu.Lock()
		c.halfClosed = st
		c.mu.Unlock()
		_ = st.cs.CloseSend()
	}
	st.sendMu.Unlock()
	select {
	case <-st.done:
	case <-time.After(closeWait):
		c.mu.Lock()
		st.ours = true
		c.closeTimeouts++
		c.mu.Unlock()
		st.cancel()
		<-st.done
	}
	st.cancel()
}
