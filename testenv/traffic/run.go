package traffic

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/testenv"
)

// tcpHeaderBytes is what each wire segment of a GSO skb carries on top of
// its payload here: an IPv4 header (20) and a TCP header with the
// timestamp option (32), which Linux sends on every data segment.
const tcpHeaderBytes = 20 + 32

// RunResult is one run of a case.
type RunResult struct {
	// Mode says what was attached at node a's POSTROUTING.
	Mode Mode
	// Rate is the throughput: Gbit/s (TCP, iperf3's receiver) or kpps
	// (UDP, datagrams counted at the server pod over the sending time).
	Rate float64
	// Sent is the sender's own count: datagrams handed to the kernel
	// (UDP) or TcpOutSegs+TcpRetransSegs of the client pod (TCP).
	// Received is the datagrams counted at the server pod (UDP).
	Sent, Received uint64
	// Retransmits are iperf3's (TCP).
	Retransmits int64
	// LostBeforeNode are the skbs the client pod's veth dropped (its
	// peer's backlog was full): sent, but never at node a (TCP).
	LostBeforeNode uint64
	// Unchecked says why the packets could not be checked against the
	// sender (TCP with GSO and skbs lost before node a); the bytes and
	// packets were still checked against each other and nftables.
	Unchecked string
	// Reference is the nftables counter of the client-to-server pair at
	// node a over the run.
	Reference flow.Counts
	// Reported is what the agent sent for the pair (runs with the agent).
	Reported flow.Counts
	// Batches the agent sent in the run, and the flows of the largest.
	Batches, MaxBatchFlows int
	// Dropped is the agent's kubezonnet_agent_dropped_* total at its end.
	Dropped flow.Counts
	// AgentCPU is the agent's utime+stime over the traffic; AgentRSS its
	// VmHWM at the end of the traffic, in bytes.
	AgentCPU time.Duration
	AgentRSS int64
	// ProgRuns and ProgTime are the agent's program's run count and run
	// time over the traffic (kernel.bpf_stats_enabled; zero without it).
	ProgRuns uint64
	ProgTime time.Duration
	// ProgMisses are runs the kernel skipped (another program was
	// running on the CPU): packets the agent never saw.
	ProgMisses uint64
	// Mismatch says how the agent's counts differ from the truth; empty
	// when they are exact (or the agent was not attached).
	Mismatch string
}

// Mode is what a run attaches at node a's POSTROUTING.
type Mode int

// Modes, in the order a case's runs alternate.
const (
	// None attaches nothing: the baseline.
	None Mode = iota
	// Empty attaches a netfilter program that only accepts, the way the
	// agent attaches its own (IPv4 and IPv6, the agent's priority): what
	// the kernel's hook costs, whatever the program does.
	Empty
	// Agent runs the real agent.
	Agent
)

// Modes are the modes of a case's runs.
var Modes = []Mode{None, Empty, Agent}

// RoundModes is the order of the runs of a case's round: Modes rotated by
// the round, so that each mode takes each place of a round as often as
// the others. A drift within rounds (the machine settling after the
// agent stops, the first run after a pause) then weighs on all modes
// alike instead of favouring whichever always ran first.
func RoundModes(round int) []Mode {
	k := round % len(Modes)
	return append(slices.Clone(Modes[k:]), Modes[:k]...)
}

func (m Mode) String() string {
	return [...]string{"without agent", "empty program", "with agent"}[m]
}

// summary is the run's progress line.
func (r RunResult) summary(c Case) string {
	s := fmt.Sprintf("%.2f %s", r.Rate, c.Unit())
	if c.Kind == UDP {
		s += fmt.Sprintf(", %d sent, %d received", r.Sent, r.Received)
	} else {
		s += fmt.Sprintf(", %d segments sent, %d retransmitted, %d skbs lost before node a", r.Sent, r.Retransmits, r.LostBeforeNode)
	}
	s += fmt.Sprintf(", reference %d bytes %d packets", r.Reference.Bytes, r.Reference.Packets)
	if r.Mode == Agent {
		s += fmt.Sprintf("; agent reported %d bytes %d packets in %d batches (largest %d flows), CPU %s, VmHWM %.1f MiB",
			r.Reported.Bytes, r.Reported.Packets, r.Batches, r.MaxBatchFlows, r.AgentCPU, float64(r.AgentRSS)/(1<<20))
	}
	if r.ProgRuns > 0 {
		s += fmt.Sprintf(", program %d runs, %.1f ns/run", r.ProgRuns, float64(r.ProgTime.Nanoseconds())/float64(r.ProgRuns))
	}
	return s
}

// run runs case c once, with mode's program attached.
func (b *bench) run(ctx context.Context, w *world, c Case, mode Mode) (r RunResult, err error) {
	r.Mode = mode
	withAgent := mode == Agent
	var ag *agentProc
	var prog ebpf.ProgramID // the program whose statistics the run reads
	if mode == Empty {
		links, err := attachEmpty(w.node, b.empty)
		if err != nil {
			return r, err
		}
		defer func() {
			for _, l := range links {
				if cerr := l.Close(); cerr != nil && err == nil {
					err = fmt.Errorf("detaching the empty program: %w", cerr)
				}
			}
		}()
		if prog, err = programID(b.empty); err != nil {
			return r, err
		}
	}
	if withAgent {
		b.rcv.reset()
		if ag, err = startAgent(ctx, b.opts, w.node, b.rcv.URL, c.FlushInterval); err != nil {
			return r, err
		}
		defer func() {
			if ag != nil {
				ag.p.Kill()
			}
		}()
	}
	refBefore, err := w.ref.Read(ctx)
	if err != nil {
		return r, err
	}
	var segsBefore, sinkBefore, lostBefore uint64
	if c.Kind == TCP {
		if segsBefore, err = testnet.TCPSegmentsSent(ctx, w.client.NS); err != nil {
			return r, err
		}
		if lostBefore, err = testnet.TxDropped(ctx, w.client.NS, "eth0"); err != nil {
			return r, err
		}
	} else if sinkBefore, err = w.sink.read(ctx); err != nil {
		return r, err
	}
	var cpuBefore time.Duration
	var progBefore progStats
	if withAgent {
		if cpuBefore, err = testenv.ProcessCPUTime(ag.p.Pid()); err != nil {
			return r, err
		}
		prog = ag.prog
	}
	if prog != 0 && !b.opts.NoBPFStats {
		if progBefore, err = readProgStats(prog); err != nil {
			return r, err
		}
	}

	var elapsed time.Duration
	switch c.Kind {
	case TCP:
		res, err := runIperf(ctx, w, b.opts.Duration, b.opts)
		if err != nil {
			return r, err
		}
		r.Rate, r.Retransmits = res.bitsPerSecond/1e9, res.retransmits
	case UDP:
		res, err := b.sendUDP(ctx, w, c, b.opts.Duration)
		if err != nil {
			return r, err
		}
		r.Sent, elapsed = res.Sent, res.Elapsed
	}
	var want uint64 // packets node a will see, where known
	if c.Kind == UDP {
		want = r.Sent
	}
	refAfter, err := settle(ctx, w.ref, w.pair, refBefore[w.pair], want)
	if err != nil {
		return r, err
	}
	r.Reference = diff(refAfter[w.pair], refBefore[w.pair])
	if c.Kind == TCP {
		segs, err := testnet.TCPSegmentsSent(ctx, w.client.NS)
		if err != nil {
			return r, err
		}
		r.Sent = segs - segsBefore
		lost, err := testnet.TxDropped(ctx, w.client.NS, "eth0")
		if err != nil {
			return r, err
		}
		r.LostBeforeNode = lost - lostBefore
	} else {
		got, err := w.sink.read(ctx)
		if err != nil {
			return r, err
		}
		r.Received = got - sinkBefore
		r.Rate = float64(r.Received) / elapsed.Seconds() / 1e3
	}
	if prog != 0 && !b.opts.NoBPFStats {
		progAfter, err := readProgStats(prog)
		if err != nil {
			return r, err
		}
		r.ProgRuns, r.ProgTime = progAfter.runs-progBefore.runs, progAfter.time-progBefore.time
		r.ProgMisses = progAfter.misses - progBefore.misses
	}
	if !withAgent {
		return r, nil
	}

	cpuAfter, err := testenv.ProcessCPUTime(ag.p.Pid())
	if err != nil {
		return r, err
	}
	r.AgentCPU = cpuAfter - cpuBefore
	if r.AgentRSS, err = testenv.ProcessPeakRSS(ag.p.Pid()); err != nil {
		return r, err
	}
	// The final drain on SIGTERM sends what the last flush left.
	if err := ag.stop(); err != nil {
		return r, err
	}
	ag = nil
	got := b.rcv.snapshot()
	if got.err != nil {
		return r, got.err
	}
	r.Reported, r.Batches, r.MaxBatchFlows, r.Dropped = got.pairs[w.pair], got.batches, got.maxFlows, got.dropped
	r.Mismatch, r.Unchecked = check(c, r)
	return r, nil
}

// check compares what the agent reported with the truth and says how they
// differ (empty: exact), and what it could not check.
func check(c Case, r RunResult) (mismatch, unchecked string) {
	var errs []error
	if r.Reference.IsZero() {
		errs = append(errs, errors.New("the reference counted nothing: no traffic passed node a"))
	}
	if r.ProgMisses > 0 {
		errs = append(errs, fmt.Errorf("the kernel skipped the agent's program %d times (recursion misses)", r.ProgMisses))
	}
	if r.Dropped.Packets > 0 {
		errs = append(errs, fmt.Errorf("the agent dropped %d packets (%d bytes) it could not count", r.Dropped.Packets, r.Dropped.Bytes))
	}
	if c.Kind == UDP {
		// One wire segment per skb: nftables counts what the agent does.
		if r.Reported != r.Reference {
			errs = append(errs, fmt.Errorf("agent reported %d bytes %d packets, nftables counted %d bytes %d packets",
				r.Reported.Bytes, r.Reported.Packets, r.Reference.Bytes, r.Reference.Packets))
		}
		return joined(errs), ""
	}
	// TCP may send GSO skbs (with offloads on; ethtool's off is not a
	// promise of one segment per skb on veth): nftables counts an skb
	// once with its length, the agent its wire segments, each with its
	// own headers. Each segment beyond the skbs adds one set of headers.
	if r.Reported.Packets < r.Reference.Packets {
		errs = append(errs, fmt.Errorf("agent reported %d packets, fewer than the %d skbs nftables counted", r.Reported.Packets, r.Reference.Packets))
		return joined(errs), ""
	}
	extra := r.Reported.Packets - r.Reference.Packets
	if want := r.Reference.Bytes + extra*tcpHeaderBytes; r.Reported.Bytes != want {
		errs = append(errs, fmt.Errorf("agent reported %d bytes, want %d: nftables' %d bytes in %d skbs plus %d bytes of headers for each of the %d further segments",
			r.Reported.Bytes, want, r.Reference.Bytes, r.Reference.Packets, tcpHeaderBytes, extra))
	}
	switch {
	case extra == 0:
		// No GSO skb passed node a: nftables' count is the segments'.
	case r.LostBeforeNode == 0:
		// The sender counted the segments, and all of them reached node a.
		if r.Reported.Packets != r.Sent {
			errs = append(errs, fmt.Errorf("agent reported %d packets, the client sent %d TCP segments (TcpOutSegs+TcpRetransSegs), none lost before node a",
				r.Reported.Packets, r.Sent))
		}
	default:
		unchecked = fmt.Sprintf("packets not checked against the sender: %d skbs (of unknown segment counts) lost before node a", r.LostBeforeNode)
	}
	return joined(errs), unchecked
}

func joined(errs []error) string {
	if err := errors.Join(errs...); err != nil {
		return err.Error()
	}
	return ""
}

func diff(a, b flow.Counts) flow.Counts {
	return flow.Counts{Bytes: a.Bytes - b.Bytes, Packets: a.Packets - b.Packets}
}

// settle reads the reference until it holds want packets more than
// before (UDP: what the sender sent, the usual end) or, when some were
// lost before node a or want is unknown (0), until two reads 100 ms apart
// agree: packets still queued between the client and node a when the
// sender stopped have then passed the hook.
func settle(ctx context.Context, ref *testnet.Reference, p testnet.Pair, before flow.Counts, want uint64) (map[testnet.Pair]flow.Counts, error) {
	prev, err := ref.Read(ctx)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if want > 0 && prev[p].Packets-before.Packets == want {
			return prev, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond): // the quiet time
		}
		cur, err := ref.Read(ctx)
		if err != nil {
			return nil, err
		}
		if cur[p] == prev[p] {
			return cur, nil
		}
		if time.Now().After(deadline) {
			return nil, errors.New("the reference counter still moves 5s after the traffic stopped")
		}
		prev = cur
	}
}
