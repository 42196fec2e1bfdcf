package main

// Tick mode (--tick-ms > 0, the default): the process wakes once per tick, not once per message.
//
// On this kind of machine (a small VM) a thread that sleeps and is woken again costs 20-80 µs of
// CPU, whatever it then does: a client woken by every receipt, result, ack timer and send timer
// spent ~100-400 µs per event. So the connections here are sockets of our own that Go's network
// poller does not watch (an arriving message wakes nothing): once per tick one goroutine asks a
// private epoll set, without waiting, which sockets have data, lets their gRPC readers read, and
// wakes the clients whose sends, acks or timers are due. A tick is a timer wake-up of ~20 µs;
// between ticks the process sleeps. Messages are read on the tick after they arrive but timed by
// the kernel's receive stamp (SO_TIMESTAMPNS) of the read that brought them; events due within a
// tick are sent on it (up to a tick of send lag, part of the latency from the schedule).

import (
	"context"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

type poller struct {
	epfd  int
	tick  time.Duration
	mu    sync.Mutex
	conns map[int32]*pconn
	tickM sync.Mutex
	tickC chan struct{} // closed at each tick (for writers waiting for room, and deadlines)
	steps chan struct{} // a tick for the stepper
	done  chan struct{}
}

func newPoller(tick time.Duration) (*poller, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	return &poller{epfd: epfd, tick: tick, conns: map[int32]*pconn{}, tickC: make(chan struct{}),
		steps: make(chan struct{}, 1), done: make(chan struct{})}, nil
}

func (p *poller) tickChan() chan struct{} {
	p.tickM.Lock()
	defer p.tickM.Unlock()
	return p.tickC
}

// run ticks until stop: ready sockets' readers, then writers and deadlines, then the clients due,
// then every goroutine this woke runs (gRPC's readers and writers, our receivers) before the next
// sleep. The sleep is a raw clock_nanosleep that keeps the P: the Go scheduler sees one busy
// goroutine, not an idle process with a timer, so neither an idle thread nor sysmon is woken at
// each tick (each such wake costs tens of µs here). Our own sockets' syscalls are raw too
// (non-blocking: they never wait), so no P is handed off around them.
func (p *poller) run(r *runner) {
	evs := make([]unix.EpollEvent, 256)
	tick := int64(p.tick)
	for {
		// the next tick of the grid k·tick from the run's clock origin (r.grid), after now: a
		// late tick (a stall) is skipped, not caught up in a burst
		var cur unix.Timespec
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &cur)
		next := unix.NsecToTimespec(r.t0Mono + ((cur.Nano()-r.t0Mono)/tick+1)*tick)
		for {
			_, _, e := unix.RawSyscall6(unix.SYS_CLOCK_NANOSLEEP, unix.CLOCK_MONOTONIC, unix.TIMER_ABSTIME,
				uintptr(unsafe.Pointer(&next)), 0, 0, 0)
			if e == 0 {
				break
			}
			if e != unix.EINTR {
				time.Sleep(p.tick)
				break
			}
			runtime.Gosched() // a signal (a preemption request, the GC): let it have its way
		}
		select {
		case <-p.done:
			return
		default:
		}
		for {
			r1, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(p.epfd), uintptr(unsafe.Pointer(&evs[0])),
				uintptr(len(evs)), 0, 0, 0)
			if e == unix.EINTR {
				continue
			}
			if e != 0 {
				break
			}
			n := int(r1)
			p.mu.Lock()
			for i := range n {
				if c := p.conns[evs[i].Fd]; c != nil {
					select {
					case c.readable <- struct{}{}:
					default:
					}
				}
			}
			p.mu.Unlock()
			if n < len(evs) {
				break
			}
		}
		p.tickM.Lock()
		close(p.tickC)
		p.tickC = make(chan struct{})
		p.tickM.Unlock()
		if r.scheduled.Load() != nil {
			select {
			case p.steps <- struct{}{}:
			default: // the stepper is still at the last tick's (a send waits for flow control)
			}
		}
		settle()
	}
}

// stepper runs the due clients' steps, once per tick, all in one goroutine: their sends of a
// tick go out together (one write per connection). Not in the poller's goroutine: a send that
// waits for the server's flow-control window needs the poller to keep ticking (that window
// arrives as a read).
func (p *poller) stepper(r *runner) {
	for {
		select {
		case <-p.steps:
		case <-p.done:
			return
		}
		clients := r.scheduled.Load()
		now := r.now()
		for _, c := range *clients {
			if c.done {
				continue
			}
			if (c.wakeAt < 0 || c.wakeAt > now) && !(c.poked.Load() && c.poked.Swap(false)) {
				continue
			}
			c.poked.Store(false)
			w, done := c.step(now)
			c.wakeAt = w
			if done {
				c.done = true
				go c.finish(&r.wg)
			}
		}
	}
}

// settle lets every goroutine the tick made runnable run before the poller sleeps again (the
// sleep keeps the P). Gosched queues the poller behind them; a few rounds, as gRPC's writer
// itself yields once before it flushes and readers wake receivers.
func settle() {
	for range 4 {
		runtime.Gosched()
	}
}

func (p *poller) stop() { close(p.done) }

// dial connects a socket of our own (non-blocking, not in Go's poller) and adds it to the set.
func (p *poller) dial(ctx context.Context, addr string) (net.Conn, error) {
	ra, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		return nil, err
	}
	var sa unix.Sockaddr
	family := unix.AF_INET
	if ip4 := ra.IP.To4(); ip4 != nil {
		s := &unix.SockaddrInet4{Port: ra.Port}
		copy(s.Addr[:], ip4)
		sa = s
	} else {
		family = unix.AF_INET6
		s := &unix.SockaddrInet6{Port: ra.Port}
		copy(s.Addr[:], ra.IP.To16())
		sa = s
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	fail := func(op string, err error) (net.Conn, error) {
		_ = unix.Close(fd)
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: ra, Err: os.NewSyscallError(op, err)}
	}
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1) // arrival times
	if err := unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS && err != unix.EINTR {
		return fail("connect", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	if d, ok := ctx.Deadline(); ok {
		deadline = d
	}
	for {
		wait := time.Until(deadline)
		if wait <= 0 {
			return fail("connect", unix.ETIMEDOUT)
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		n, err := unix.Poll(pfd, int(min(wait, 100*time.Millisecond)/time.Millisecond)+1)
		if err == unix.EINTR || (err == nil && n == 0) {
			if ctx.Err() != nil {
				return fail("connect", ctx.Err())
			}
			continue
		}
		if err != nil {
			return fail("poll", err)
		}
		break
	}
	if soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || soerr != 0 {
		if err == nil {
			err = unix.Errno(soerr)
		}
		return fail("connect", err)
	}
	c := &pconn{fd: fd, p: p, readable: make(chan struct{}, 1), closed: make(chan struct{}), raddr: ra}
	if lsa, err := unix.Getsockname(fd); err == nil {
		switch a := lsa.(type) {
		case *unix.SockaddrInet4:
			c.laddr = &net.TCPAddr{IP: net.IP(a.Addr[:]), Port: a.Port}
		case *unix.SockaddrInet6:
			c.laddr = &net.TCPAddr{IP: net.IP(a.Addr[:]), Port: a.Port}
		}
	}
	if c.laddr == nil {
		c.laddr = &net.TCPAddr{}
	}
	p.mu.Lock()
	p.conns[int32(fd)] = c
	p.mu.Unlock()
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP, Fd: int32(fd)}
	if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		p.mu.Lock()
		delete(p.conns, int32(fd))
		p.mu.Unlock()
		return fail("epoll_ctl", err)
	}
	return c, nil
}

// pconn is a net.Conn on a socket the poller watches. Syscalls run under a read lock, Close takes
// the write lock, so a closed descriptor number is never read or written (it may be reused).
type pconn struct {
	p        *poller
	rw       sync.RWMutex
	fd       int  // -1 once closed
	drained  bool // the reader's: its last read was short (the socket had no more)
	oob      [64]byte
	stamp    atomic.Int64 // kernel arrival time (wall ns) of the last read's data, 0 if none
	readable chan struct{}
	closed   chan struct{}
	once     sync.Once
	laddr    net.Addr
	raddr    net.Addr
	rdl, wdl atomic.Int64 // deadlines, unix ns (0: none)
}

var errDeadline = os.ErrDeadlineExceeded

func (c *pconn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	for {
		c.rw.RLock()
		if c.fd < 0 {
			c.rw.RUnlock()
			return 0, net.ErrClosed
		}
		if c.drained { // the last read was short: wait for the poller before trying again
			c.rw.RUnlock()
			c.drained = false
			if err := c.wait(&c.rdl, c.readable); err != nil {
				return 0, err
			}
			continue
		}
		iov := unix.Iovec{Base: &b[0]}
		iov.SetLen(len(b))
		msg := unix.Msghdr{Iov: &iov, Control: &c.oob[0]}
		msg.SetIovlen(1)
		msg.SetControllen(len(c.oob))
		r1, _, e := unix.RawSyscall(unix.SYS_RECVMSG, uintptr(c.fd), uintptr(unsafe.Pointer(&msg)), 0)
		c.rw.RUnlock()
		n := int(r1)
		switch {
		case e == 0 && n > 0:
			c.drained = n < len(b)
			c.stamp.Store(rxStamp(c.oob[:msg.Controllen]))
			return n, nil
		case e == 0:
			return 0, io.EOF
		case e == unix.EINTR:
			continue
		case e != unix.EAGAIN:
			return 0, &net.OpError{Op: "read", Net: "tcp", Addr: c.raddr, Err: os.NewSyscallError("read", e)}
		}
		if err := c.wait(&c.rdl, c.readable); err != nil {
			return 0, err
		}
	}
}

func (c *pconn) Write(b []byte) (int, error) {
	total := 0
	for total < len(b) {
		c.rw.RLock()
		if c.fd < 0 {
			c.rw.RUnlock()
			return total, net.ErrClosed
		}
		rest := b[total:]
		r1, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(c.fd), uintptr(unsafe.Pointer(&rest[0])), uintptr(len(rest)))
		c.rw.RUnlock()
		if e == 0 && r1 > 0 {
			total += int(r1)
			continue
		}
		if e == unix.EINTR {
			continue
		}
		if e != unix.EAGAIN {
			var err error = e
			if e == 0 {
				err = io.ErrShortWrite
			}
			return total, &net.OpError{Op: "write", Net: "tcp", Addr: c.raddr, Err: os.NewSyscallError("write", err)}
		}
		if err := c.wait(&c.wdl, nil); err != nil { // no room: try again next tick
			return total, err
		}
	}
	return total, nil
}

// wait for `ready` (or, with a deadline or none given, the next tick), Close, or the deadline.
func (c *pconn) wait(deadline *atomic.Int64, ready chan struct{}) error {
	dl := deadline.Load()
	if dl != 0 && time.Now().UnixNano() >= dl {
		return errDeadline
	}
	var tick chan struct{}
	if dl != 0 || ready == nil {
		tick = c.p.tickChan()
	}
	select {
	case <-ready:
	case <-tick:
	case <-c.closed:
		return net.ErrClosed
	}
	return nil
}

func (c *pconn) Close() error {
	err := net.ErrClosed
	c.once.Do(func() {
		close(c.closed)
		c.rw.Lock()
		fd := c.fd
		c.fd = -1
		c.rw.Unlock()
		c.p.mu.Lock()
		delete(c.p.conns, int32(fd))
		c.p.mu.Unlock()
		_ = unix.EpollCtl(c.p.epfd, unix.EPOLL_CTL_DEL, fd, nil)
		err = unix.Close(fd)
	})
	return err
}

func (c *pconn) LocalAddr() net.Addr  { return c.laddr }
func (c *pconn) RemoteAddr() net.Addr { return c.raddr }

func deadlineNs(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func (c *pconn) SetDeadline(t time.Time) error {
	c.rdl.Store(deadlineNs(t))
	c.wdl.Store(deadlineNs(t))
	return nil
}
func (c *pconn) SetReadDeadline(t time.Time) error  { c.rdl.Store(deadlineNs(t)); return nil }
func (c *pconn) SetWriteDeadline(t time.Time) error { c.wdl.Store(deadlineNs(t)); return nil }

var _ net.Conn = (*pconn)(nil)

// rxStamp: the SO_TIMESTAMPNS control message's time (wall ns), 0 if there is none.
func rxStamp(oob []byte) int64 {
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		if h.Len < unix.SizeofCmsghdr || int(h.Len) > len(oob) {
			return 0
		}
		if h.Level == unix.SOL_SOCKET && h.Type == unix.SO_TIMESTAMPNS && int(h.Len) >= unix.SizeofCmsghdr+16 {
			ts := (*unix.Timespec)(unsafe.Pointer(&oob[unix.SizeofCmsghdr]))
			return ts.Nano()
		}
		next := unix.CmsgSpace(int(h.Len) - unix.SizeofCmsghdr)
		if next > len(oob) {
			return 0
		}
		oob = oob[next:]
	}
	return 0
}
