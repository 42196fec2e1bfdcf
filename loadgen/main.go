// nimbus-loadgen: a compiled, low-CPU load generator for Nimbus (see README.md in this folder).
//
// Each client is one gRPC stream (ProcessEvent) sending `sq` events on its own open-loop
// schedule; every result is matched to its event (protocol 2: by seq, deduplicated by delivery id,
// acked in batches; protocol 1: in the order sent) and checked (result = number²). The summary
// says what was sent, answered, lost, duplicated or reordered, the latency from the scheduled
// send (no coordinated omission) and from the actual send, and the CPU this process spent.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"golang.org/x/sys/unix"
)

// defaultProcs is GOMAXPROCS unless the environment sets it: measured against a real-engine
// Nimbus on the 2-CPU machine, 1 costs less CPU per event than 2 (README.md).
const defaultProcs = 1

const progressEvery = 5 * time.Second

type config struct {
	targets        []string
	clients        int
	rate           float64
	duration       float64 // seconds of sending (0: unbounded, --events ends it)
	events         int64   // per client (0: unbounded, --duration ends it)
	warmup         float64
	window         int
	protocol       int
	prefix         string
	timeout        float64
	jsonPath       string
	reconnectAt    float64
	connsPer       int // connections per target shared by its clients (0: one per client)
	connectTimeout float64
	tickMs         float64
	stageSample    int // every Nth result of a client has its trace decoded into stages (0: none)
	quiet          bool
}

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func parseFlags(args []string) (*config, error) {
	cfg := &config{}
	fs := flag.NewFlagSet("nimbus-loadgen", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	targets := fs.String("targets", "127.0.0.1:50051", "host:port[,host:port...]; client i uses target i mod len")
	fs.IntVar(&cfg.clients, "clients", 10, "clients (one stream each)")
	fs.Float64Var(&cfg.rate, "rate", 1000, "events/s across all clients (0: unpaced, --window in flight per client)")
	fs.Float64Var(&cfg.duration, "duration", 10, "seconds of sending")
	fs.Int64Var(&cfg.events, "events", 0, "events per client (alone: no time limit; with --duration: whichever ends first)")
	fs.Float64Var(&cfg.warmup, "warmup", 0, "seconds: results of events due in the first S seconds are left out of latency stats")
	fs.IntVar(&cfg.window, "window", 100, "unpaced (--rate 0): events each client keeps unanswered in flight")
	fs.IntVar(&cfg.protocol, "protocol", 2, "1 (the original's) or 2 (receipts, seq, acks)")
	fs.StringVar(&cfg.prefix, "prefix", "", "client ids are <prefix>-<i> (default: lg-<random>)")
	fs.Float64Var(&cfg.timeout, "timeout", 30, "seconds to wait for the last results once sending stops")
	fs.StringVar(&cfg.jsonPath, "json", "", "write the JSON summary here (and print it as stdout's last line)")
	fs.Float64Var(&cfg.reconnectAt, "reconnect-at", 0, "seconds after its start: each client cuts its stream and moves to the next target (protocol 2)")
	conns := fs.String("conns", "client", "client: one connection per client (as the client library); N: N per target, shared by its clients (shared = 1)")
	fs.Float64Var(&cfg.connectTimeout, "connect-timeout", 5, "seconds to reach each target before the run")
	fs.Float64Var(&cfg.tickMs, "tick-ms", 1, "ms: sockets are read and sends made once per tick (low CPU); 0: on every message (exact times, more CPU)")
	fs.IntVar(&cfg.stageSample, "stage-sample", 10, "every Nth result of each client: its trace timed per pipeline stage (0: off)")
	fs.BoolVar(&cfg.quiet, "quiet", false, "no progress lines on stderr")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return nil, usageError{fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	bad := func(format string, a ...any) (*config, error) { return nil, usageError{fmt.Sprintf(format, a...)} }
	for _, t := range strings.Split(*targets, ",") {
		t = strings.TrimSpace(t)
		host, port, err := net.SplitHostPort(t)
		if err != nil || host == "" {
			return bad("--targets: %q is not host:port", t)
		}
		if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
			return bad("--targets: bad port in %q", t)
		}
		cfg.targets = append(cfg.targets, t)
	}
	switch {
	case cfg.clients < 1 || cfg.clients > 100000:
		return bad("--clients must be 1..100000, not %d", cfg.clients)
	case cfg.rate < 0 || cfg.rate > 1e7 || cfg.rate != cfg.rate:
		return bad("--rate must be >= 0 (0: unpaced), not %g", cfg.rate)
	case cfg.events < 0:
		return bad("--events must be >= 1")
	case set["events"] && cfg.events == 0:
		return bad("--events must be >= 1")
	case cfg.duration <= 0 || cfg.duration > 86400 || cfg.duration != cfg.duration:
		return bad("--duration must be > 0 seconds, not %g", cfg.duration)
	case cfg.warmup < 0 || cfg.warmup != cfg.warmup:
		return bad("--warmup must be >= 0 seconds")
	case cfg.window < 1:
		return bad("--window must be >= 1, not %d", cfg.window)
	case cfg.protocol != 1 && cfg.protocol != 2:
		return bad("--protocol must be 1 or 2, not %d", cfg.protocol)
	case cfg.timeout <= 0 || cfg.timeout > 86400 || cfg.timeout != cfg.timeout:
		return bad("--timeout must be > 0 seconds, not %g", cfg.timeout)
	case cfg.reconnectAt < 0 || cfg.reconnectAt != cfg.reconnectAt:
		return bad("--reconnect-at must be > 0 seconds")
	case cfg.reconnectAt > 0 && cfg.protocol != 2:
		return bad("--reconnect-at needs --protocol 2 (protocol 1 has no receipts to resend by)")
	case *conns != "client" && *conns != "shared" && !positiveInt(*conns):
		return bad("--conns must be client, shared or a number of connections per target, not %q", *conns)
	case cfg.connectTimeout <= 0:
		return bad("--connect-timeout must be > 0 seconds")
	case cfg.tickMs < 0 || cfg.tickMs > 1000 || cfg.tickMs != cfg.tickMs:
		return bad("--tick-ms must be 0..1000, not %g", cfg.tickMs)
	case cfg.stageSample < 0:
		return bad("--stage-sample must be >= 0 (0: off), not %d", cfg.stageSample)
	}
	if set["events"] && !set["duration"] {
		cfg.duration = 0 // the count ends it
	}
	if cfg.duration > 0 && cfg.warmup >= cfg.duration {
		return bad("--warmup (%g s) must be shorter than --duration (%g s)", cfg.warmup, cfg.duration)
	}
	if cfg.duration > 0 && cfg.reconnectAt >= cfg.duration {
		return bad("--reconnect-at (%g s) must be within --duration (%g s)", cfg.reconnectAt, cfg.duration)
	}
	switch *conns {
	case "client":
	case "shared":
		cfg.connsPer = 1
	default:
		cfg.connsPer, _ = strconv.Atoi(*conns)
	}
	if cfg.prefix == "" {
		b := make([]byte, 4)
		_, _ = rand.Read(b)
		cfg.prefix = "lg-" + hex.EncodeToString(b)
	}
	for _, ch := range cfg.prefix {
		if ch < 0x21 || ch > 0x7e {
			return bad("--prefix must be printable ASCII without spaces")
		}
	}
	return cfg, nil
}

type runner struct {
	cfg        *config
	ctx        context.Context
	t0         time.Time
	t0Real     int64 // t0 on the wall clock (the kernel's arrival stamps are wall-clock)
	t0Mono     int64 // t0 on CLOCK_MONOTONIC (the poller's ticks)
	tick       int64 // ns, 0: event mode
	schedStart int64 // ns: the schedule's origin
	sendFor    int64 // ns of sending after schedStart
	perClient  int64 // events per client at most
	interval   int64 // ns between a client's events (paced)
	paced      bool
	warmupEnd  int64
	live       liveHist
	stages     stageSet  // per-stage latency of the sampled results' traces
	shared     [][]*conn // [target][k] with --conns N
	stopCh     chan struct{}
	stopOnce   sync.Once
	clients    []*client
	scheduled  atomic.Pointer[[]*client] // the clients the poller drives (tick mode)
	wg         sync.WaitGroup            // the clients not finished
	poll       *poller                   // tick mode
}

func (r *runner) now() int64 { return int64(time.Since(r.t0)) }

// grid rounds a time up to the ticks' grid (tick mode): events are scheduled on ticks, so the
// tick does not add send lag (what lag remains is the sender's own).
func (r *runner) grid(t int64) int64 {
	if r.tick == 0 {
		return t
	}
	return (t + r.tick - 1) / r.tick * r.tick
}

func (r *runner) stopped() bool {
	select {
	case <-r.stopCh:
		return true
	default:
		return false
	}
}

// conn is a gRPC connection and, in tick mode, the socket it currently runs on (whose last
// read's arrival time the receivers take as their messages').
type conn struct {
	cc *grpc.ClientConn
	pc atomic.Pointer[pconn]
}

func (r *runner) dial(target string) (*conn, error) {
	c := &conn{}
	opts := []grpc.DialOption{}
	if r.poll != nil {
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			pc, err := r.poll.dial(ctx, addr)
			if err != nil {
				return nil, err
			}
			c.pc.Store(pc.(*pconn))
			return pc, nil
		}))
	}
	cc, err := grpc.NewClient("passthrough:///"+target, append(opts,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// Fixed windows turn off the BDP pings (the server would answer each one).
		grpc.WithInitialWindowSize(1<<20),
		grpc.WithInitialConnWindowSize(1<<21),
		grpc.WithSharedWriteBuffer(true),
		grpc.WithReadBufferSize(16<<10),
		grpc.WithWriteBufferSize(16<<10),
		grpc.WithUserAgent("nimbus-loadgen"),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(codec{})),
	)...)
	if err != nil {
		return nil, err
	}
	c.cc = cc
	return c, nil
}

// probe checks a target answers TCP and completes the HTTP/2 handshake of a gRPC connection.
func (r *runner) probe(target string) (*conn, error) {
	timeout := time.Duration(r.cfg.connectTimeout * float64(time.Second))
	nc, err := net.DialTimeout("tcp", target, timeout)
	if err != nil {
		return nil, err
	}
	_ = nc.Close()
	c, err := r.dial(target)
	if err != nil {
		return nil, err
	}
	cc := c.cc
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cc.Connect()
	for {
		s := cc.GetState()
		if s == connectivity.Ready {
			return c, nil
		}
		if s == connectivity.TransientFailure || s == connectivity.Shutdown {
			_ = cc.Close()
			return nil, errors.New("no gRPC server there (the HTTP/2 connection failed)")
		}
		if !cc.WaitForStateChange(ctx, s) {
			_ = cc.Close()
			return nil, fmt.Errorf("no gRPC connection within %gs", r.cfg.connectTimeout)
		}
	}
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) (code int) {
	cfg, err := parseFlags(args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage()
			return 0
		}
		fmt.Fprintf(os.Stderr, "nimbus-loadgen: %s (--help for the flags)\n", err)
		return 2
	}
	defer func() {
		if p := recover(); p != nil {
			fmt.Fprintf(os.Stderr, "nimbus-loadgen: internal error: %v\n%s", p, debug.Stack())
			code = 1
		}
	}()
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(defaultProcs)
	}
	if p := os.Getenv("NIMBUS_LOADGEN_CPUPROFILE"); p != "" {
		f, err := os.Create(p)
		if err == nil {
			_ = pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400) // a small heap: fewer collections for the same memory
	}
	r := &runner{cfg: cfg, t0: time.Now(), stopCh: make(chan struct{})}
	r.t0Real = r.t0.UnixNano()
	var mono unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &mono) // Go's monotonic clock, read now
	r.t0Mono = mono.Nano()
	r.tick = int64(cfg.tickMs * float64(time.Millisecond))
	var cancel context.CancelFunc
	r.ctx, cancel = context.WithCancel(context.Background())
	defer cancel()

	if cfg.tickMs > 0 {
		r.poll, err = newPoller(time.Duration(cfg.tickMs * float64(time.Millisecond)))
		if err != nil {
			fmt.Fprintf(os.Stderr, "nimbus-loadgen: internal error: epoll: %s\n", err)
			return 1
		}
		go r.poll.run(r)
		go r.poll.stepper(r)
		defer r.poll.stop()
	}
	for _, t := range cfg.targets {
		cc, err := r.probe(t)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nimbus-loadgen: cannot reach %s: %s\n", t, oneLine(err))
			return 3
		}
		if cfg.connsPer > 0 {
			pool := []*conn{cc}
			for len(pool) < cfg.connsPer {
				more, err := r.dial(t)
				if err != nil {
					fmt.Fprintf(os.Stderr, "nimbus-loadgen: cannot reach %s: %s\n", t, oneLine(err))
					return 3
				}
				pool = append(pool, more)
			}
			r.shared = append(r.shared, pool)
		} else {
			_ = cc.cc.Close()
		}
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		fmt.Fprintln(os.Stderr, "nimbus-loadgen: interrupted: sending stops, waiting for the last results (again to quit)")
		r.stop()
		<-sig
		os.Exit(130)
	}()

	r.paced = cfg.rate > 0
	r.perClient = 1 << 62
	if cfg.events > 0 {
		r.perClient = cfg.events
	}
	r.sendFor = 1 << 62
	if cfg.duration > 0 {
		r.sendFor = int64(cfg.duration * 1e9)
	}
	if r.paced {
		r.interval = max(1, int64(float64(cfg.clients)/cfg.rate*1e9))
	}

	// Setup: every client's stream is open before the schedule starts.
	r.clients = make([]*client, cfg.clients)
	seed := mrand.Uint64()
	for i := range r.clients {
		c := &client{
			r: r, i: i, id: fmt.Sprintf("%s-%d", cfg.prefix, i),
			rng:          mrand.New(mrand.NewPCG(seed, uint64(i))),
			conns:        map[int]*conn{},
			wake:         make(chan struct{}, 1),
			streamErrors: map[string]int{},
			reconnFirst:  -1,
		}
		c.wakeAt = 0 // due at once
		pairs := []string{"client_id", c.id}
		if cfg.protocol == 2 {
			pairs = append(pairs, "nimbus-protocol", "2")
		}
		c.md = metadata.Pairs(pairs...)
		if r.paced {
			c.phase = c.rng.Int64N(r.interval)
		}
		if cfg.events > 0 && r.paced {
			c.events = make([]event, 0, min(cfg.events, 1<<20))
		} else if r.paced && cfg.duration > 0 {
			c.events = make([]event, 0, min(int64(cfg.duration*cfg.rate/float64(cfg.clients))+2, 1<<20))
		}
		c.bySeq = make([]int32, 0, cap(c.events))
		r.clients[i] = c
	}
	var setup sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i, c := range r.clients {
		setup.Add(1)
		sem <- struct{}{}
		go func() {
			defer setup.Done()
			defer func() { <-sem }()
			if err := c.open(i % len(cfg.targets)); err != nil {
				c.mu.Lock()
				c.streamErrors["OPEN:"+status.Code(err).String()]++
				c.target = i % len(cfg.targets)
				c.mu.Unlock()
			}
		}()
	}
	setup.Wait()
	var ru0 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	r.schedStart = r.now()
	r.warmupEnd = r.schedStart + int64(cfg.warmup*1e9)
	for _, c := range r.clients {
		if cfg.reconnectAt > 0 {
			c.cutAt = r.schedStart + c.phase + int64(cfg.reconnectAt*1e9)
		}
	}
	if !cfg.quiet {
		describe(r)
	}

	progressDone := make(chan struct{})
	if !cfg.quiet {
		go r.progress(progressDone)
	}
	for _, c := range r.clients {
		c.mu.Lock()
		c.sending = true
		c.mu.Unlock()
	}
	r.wg.Add(len(r.clients))
	if r.poll != nil {
		r.scheduled.Store(&r.clients) // the poller drives them from its next tick
	} else {
		for _, c := range r.clients {
			go c.run(&r.wg)
		}
	}
	r.wg.Wait()
	close(progressDone)
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	for _, pool := range r.shared {
		for _, cc := range pool {
			_ = cc.cc.Close()
		}
	}

	sum := r.summary(&ru0, &ru)
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // the stages' "->" as is, not \u003e
	if err := enc.Encode(sum); err != nil {
		fmt.Fprintf(os.Stderr, "nimbus-loadgen: internal error: %s\n", err)
		return 1
	}
	out := bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
	printHuman(sum)
	if cfg.jsonPath != "" {
		if err := os.WriteFile(cfg.jsonPath, append(out, '\n'), 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "nimbus-loadgen: cannot write %s: %s\n", cfg.jsonPath, err)
			return 1
		}
		fmt.Println(string(out))
	}
	return 0
}

func (r *runner) stop() { r.stopOnce.Do(func() { close(r.stopCh) }) }

func positiveInt(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n > 0 && n <= 10000
}

func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}

func usage() {
	fmt.Print(`nimbus-loadgen: a low-CPU load generator for Nimbus (gRPC ProcessEvent, event "sq").

  nimbus-loadgen --targets 127.0.0.1:50051,127.0.0.1:50052 --clients 50 --rate 2000 \
      --duration 20 --warmup 2 --json artifacts/loadgen.json

Flags:
  --targets host:port[,...]  client i uses target i mod len (default 127.0.0.1:50051)
  --clients N                clients, one stream each (default 10)
  --rate R                   events/s across all clients, open loop, each client at R/N with a
                             random phase; 0: unpaced, --window events in flight per client
  --duration S               seconds of sending (default 10)
  --events N                 events per client (alone: no time limit)
  --warmup S                 events due in the first S seconds: checked, not in latency stats
  --window W                 unpaced: events in flight per client (default 100)
  --protocol 1|2             default 2 (seq, receipts, acks); 1: the original's
  --prefix STR               client ids <prefix>-<i> (default lg-<random>)
  --timeout S                wait for the last results after sending (default 30)
  --json PATH                write the JSON summary; also printed as stdout's last line
  --reconnect-at S           each client cuts its stream S s after its start and resumes on the
                             next target (protocol 2)
  --conns client|shared|N    one connection per client (default, as the client library), or
                             N per target shared by its clients (shared = 1): less CPU here
  --connect-timeout S        reaching each target before the run (default 5)
  --stage-sample N           every Nth result of each client: its trace timed per pipeline
                             stage, "stages_ms" (default 10; 0: off)
  --quiet                    no progress lines

Exit: 0 the run completed (see "ok" in the summary), 1 internal failure, 2 bad flags,
3 a target unreachable. GOMAXPROCS and GOGC from the environment are honoured.
`)
}

func describe(r *runner) {
	cfg := r.cfg
	what := fmt.Sprintf("%g events/s", cfg.rate)
	if !r.paced {
		what = fmt.Sprintf("unpaced, window %d", cfg.window)
	}
	limit := fmt.Sprintf("%gs", cfg.duration)
	if cfg.events > 0 {
		limit = fmt.Sprintf("%d events/client", cfg.events)
		if cfg.duration > 0 {
			limit += fmt.Sprintf(" or %gs", cfg.duration)
		}
	}
	fmt.Fprintf(os.Stderr, "nimbus-loadgen: %d clients (%s-*), protocol %d, %s, %s, targets %s, GOMAXPROCS %d\n",
		cfg.clients, cfg.prefix, cfg.protocol, what, limit, strings.Join(cfg.targets, ","), runtime.GOMAXPROCS(0))
}

func (r *runner) progress(done chan struct{}) {
	t := time.NewTicker(progressEvery)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		var sent, results, inflight int
		for _, c := range r.clients {
			c.mu.Lock()
			sent += c.sent
			results += c.results
			inflight += c.outstanding
			c.mu.Unlock()
		}
		p99, n := r.live.takeP99()
		p := "-"
		if n > 0 {
			p = fmt.Sprintf("%.1f ms", p99)
		}
		fmt.Fprintf(os.Stderr, "nimbus-loadgen: %5.1fs sent %d results %d in flight %d p99 %s\n",
			float64(r.now()-r.schedStart)/1e9, sent, results, inflight, p)
	}
}

type reconnectSummary struct {
	Clients          int    `json:"clients"`
	ReconnectFirstMs pctMax `json:"reconnect_first_ms"`
	BacklogLastMs    pctMax `json:"backlog_last_ms"`
	BacklogEvents    int    `json:"backlog_events"`
	BacklogResults   int    `json:"backlog_results"`
	Resent           int    `json:"resent"`
}

type summary struct {
	Sent                int               `json:"sent"`
	Receipted           int               `json:"receipted"`
	Results             int               `json:"results"`
	DuplicatesDropped   int               `json:"duplicates_dropped"`
	AppDuplicates       int               `json:"app_duplicates"`
	ResendDuplicates    int               `json:"resend_duplicates"`
	Lost                int               `json:"lost"`
	Refused             int               `json:"refused"`
	RefusedFinal        int               `json:"refused_final"`
	Retried             int               `json:"retried"`
	OutOfOrder          int               `json:"out_of_order"`
	Gaps                int               `json:"gaps"`
	Wrong               int               `json:"wrong"`
	Unmatched           int               `json:"unmatched"`
	ResultErrors        int               `json:"result_errors"`
	ResultBeforeReceipt int               `json:"result_before_receipt"`
	Resent              int               `json:"resent"`
	ElapsedS            float64           `json:"elapsed_s"`
	SendS               float64           `json:"send_s"`
	RateTarget          float64           `json:"rate_target"`
	RateAchieved        float64           `json:"rate_achieved"`
	LatencyMs           pct               `json:"latency_ms"`
	LatencyActualMs     pct               `json:"latency_actual_ms"`
	ReceiptMs           pct2              `json:"receipt_ms"`
	MaxScheduleLagMs    float64           `json:"max_schedule_lag_ms"`
	CPUS                float64           `json:"cpu_s"`
	CPUUsPerEvent       float64           `json:"cpu_us_per_event"`
	CPURunS             float64           `json:"cpu_run_s"`
	CPURunUsPerEvent    float64           `json:"cpu_run_us_per_event"`
	StreamsOpened       int               `json:"streams_opened"`
	StreamErrors        map[string]int    `json:"stream_errors"`
	CloseTimeouts       int               `json:"close_timeouts"`
	Reconnect           *reconnectSummary `json:"reconnect,omitempty"`
	StagesMs            []stageOut        `json:"stages_ms"`
	Clients             int               `json:"clients"`
	Protocol            int               `json:"protocol"`
	Targets             []string          `json:"targets"`
	Prefix              string            `json:"prefix"`
	Gomaxprocs          int               `json:"gomaxprocs"`
	OK                  bool              `json:"ok"`
}

func cpuSeconds(ru *syscall.Rusage) float64 {
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func round(x float64, digits int) float64 {
	p := 1.0
	for range digits {
		p *= 10
	}
	if x >= 0 {
		return float64(int64(x*p+0.5)) / p
	}
	return -float64(int64(-x*p+0.5)) / p
}

func (r *runner) summary(ru0, ru *syscall.Rusage) *summary {
	cfg := r.cfg
	s := &summary{StreamErrors: map[string]int{}, Clients: cfg.clients, Protocol: cfg.protocol,
		Targets: cfg.targets, Prefix: cfg.prefix, Gomaxprocs: runtime.GOMAXPROCS(0), RateTarget: cfg.rate}
	var lat, latActual, receipt, reconnFirst, backlogLast []int64
	firstSend, lastSend, lastResult := int64(-1), int64(0), int64(0)
	var maxLag int64
	var rec reconnectSummary
	for _, c := range r.clients {
		c.mu.Lock()
		s.Sent += c.sent
		s.Receipted += c.receipted
		s.Results += c.results
		s.DuplicatesDropped += c.dupDropped
		s.AppDuplicates += c.appDup
		s.ResendDuplicates += c.resendDup
		s.Refused += c.refused
		s.RefusedFinal += c.refusedFinal
		s.Retried += c.retried
		s.OutOfOrder += c.outOfOrder
		s.Gaps += c.gaps
		s.Wrong += c.wrong
		s.Unmatched += c.unmatched
		s.ResultErrors += c.resultErrors
		s.ResultBeforeReceipt += c.resultBeforeReceipt
		s.Resent += c.resent
		s.StreamsOpened += c.streamsOpened
		s.CloseTimeouts += c.closeTimeouts
		for k, v := range c.streamErrors {
			s.StreamErrors[k] += v
		}
		if c.sent > 0 {
			if firstSend < 0 || c.firstSend < firstSend {
				firstSend = c.firstSend
			}
			lastSend = max(lastSend, c.lastSend)
		}
		lastResult = max(lastResult, c.lastResult)
		maxLag = max(maxLag, c.maxLag)
		for k := range c.events {
			ev := &c.events[k]
			if ev.result == 0 && ev.flags&fRefused == 0 {
				s.Lost++
			}
			if ev.sched < r.warmupEnd {
				continue
			}
			if ev.result != 0 {
				lat = append(lat, ev.result-ev.sched)
				latActual = append(latActual, ev.result-ev.sent)
			}
			if ev.receipt != 0 {
				receipt = append(receipt, ev.receipt-ev.sched)
			}
		}
		if c.cutDone {
			rec.Clients++
			rec.BacklogEvents += c.backlog
			rec.BacklogResults += c.backlogResults
			if c.reconnFirst >= 0 {
				reconnFirst = append(reconnFirst, c.reconnFirst)
				if c.backlogResults > 0 && c.cutStream != nil {
					backlogLast = append(backlogLast, max(0, c.backlogLast-c.cutStream.firstResult))
				}
			}
		}
		c.mu.Unlock()
	}
	// results settled inside the sending window, for the achieved rate
	var inWindow int
	for _, c := range r.clients {
		c.mu.Lock()
		for k := range c.events {
			if t := c.events[k].result; t != 0 && t <= lastSend {
				inWindow++
			}
		}
		c.mu.Unlock()
	}
	if firstSend >= 0 {
		s.SendS = round(float64(lastSend-firstSend)/1e9, 3)
		s.ElapsedS = round(float64(max(lastResult, lastSend)-firstSend)/1e9, 3)
		if lastSend > firstSend {
			s.RateAchieved = round(float64(inWindow)/(float64(lastSend-firstSend)/1e9), 1)
		}
	}
	s.LatencyMs = percentiles(lat)
	s.LatencyActualMs = percentiles(latActual)
	s.ReceiptMs = percentiles2(receipt)
	s.MaxScheduleLagMs = ms(maxLag)
	s.StagesMs = r.stages.summary()
	s.CPUS = round(cpuSeconds(ru), 3)
	s.CPURunS = round(cpuSeconds(ru)-cpuSeconds(ru0), 3)
	if s.Sent > 0 {
		s.CPUUsPerEvent = round(cpuSeconds(ru)*1e6/float64(s.Sent), 2)
		s.CPURunUsPerEvent = round((cpuSeconds(ru)-cpuSeconds(ru0))*1e6/float64(s.Sent), 2)
	}
	if cfg.reconnectAt > 0 {
		rec.ReconnectFirstMs = percentilesMax(reconnFirst)
		rec.BacklogLastMs = percentilesMax(backlogLast)
		rec.Resent = s.Resent
		s.Reconnect = &rec
	}
	// A resent event (its receipt died with a cut stream) may have been accepted twice: its
	// second result is counted in app_duplicates and resend_duplicates, and dropped by its seq
	// as the client library does; only a duplicate nothing explains fails the run.
	s.OK = s.Sent > 0 && s.Lost == 0 && s.OutOfOrder == 0 && s.AppDuplicates == s.ResendDuplicates && s.Wrong == 0
	return s
}

func printHuman(s *summary) {
	fmt.Printf("sent %d  receipted %d  results %d  lost %d  refused %d  duplicates dropped %d  app duplicates %d  out of order %d  gaps %d  wrong %d\n",
		s.Sent, s.Receipted, s.Results, s.Lost, s.Refused, s.DuplicatesDropped, s.AppDuplicates, s.OutOfOrder, s.Gaps, s.Wrong)
	fmt.Printf("sending %.2fs, last result at %.2fs, %.1f results/s (target %g)\n", s.SendS, s.ElapsedS, s.RateAchieved, s.RateTarget)
	l := s.LatencyMs
	fmt.Printf("latency from schedule (ms): p50 %.2f  p90 %.2f  p99 %.2f  p99.9 %.2f  max %.2f  (n %d)\n", l.P50, l.P90, l.P99, l.P999, l.Max, l.N)
	l = s.LatencyActualMs
	fmt.Printf("latency from send (ms):     p50 %.2f  p90 %.2f  p99 %.2f  p99.9 %.2f  max %.2f\n", l.P50, l.P90, l.P99, l.P999, l.Max)
	fmt.Printf("receipt (ms): p50 %.2f  p99 %.2f; max schedule lag %.2f ms\n", s.ReceiptMs.P50, s.ReceiptMs.P99, s.MaxScheduleLagMs)
	fmt.Printf("cpu %.3fs (%.1f µs/event; %.1f µs/event after setup), GOMAXPROCS %d\n", s.CPUS, s.CPUUsPerEvent, s.CPURunUsPerEvent, s.Gomaxprocs)
	if len(s.StagesMs) > 0 {
		fmt.Println("latency by stage (ms, sampled traces):")
		w := 0
		for _, st := range s.StagesMs {
			w = max(w, len(st.Stage))
		}
		for _, st := range s.StagesMs {
			fmt.Printf("  %-*s  p50 %7.2f  p99 %7.2f  (n %d)\n", w, st.Stage, st.P50, st.P99, st.N)
		}
	}
	if len(s.StreamErrors) > 0 {
		keys := make([]string, 0, len(s.StreamErrors))
		for k := range s.StreamErrors {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		parts := make([]string, len(keys))
		for i, k := range keys {
			parts[i] = fmt.Sprintf("%s %d", k, s.StreamErrors[k])
		}
		fmt.Printf("streams opened %d; errors: %s\n", s.StreamsOpened, strings.Join(parts, ", "))
	}
	if rc := s.Reconnect; rc != nil {
		fmt.Printf("reconnect (%d clients): first result p50 %.1f p99 %.1f max %.1f ms; backlog %d events, %d results, last p50 %.1f p99 %.1f max %.1f ms\n",
			rc.Clients, rc.ReconnectFirstMs.P50, rc.ReconnectFirstMs.P99, rc.ReconnectFirstMs.Max,
			rc.BacklogEvents, rc.BacklogResults, rc.BacklogLastMs.P50, rc.BacklogLastMs.P99, rc.BacklogLastMs.Max)
	}
	verdict := "OK"
	if !s.OK {
		verdict = "NOT OK"
	}
	fmt.Println(verdict)
}
