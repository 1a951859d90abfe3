package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// Datapath is what the agent needs of the kernel side (bpf.Datapath).
type Datapath interface {
	Drain(dst *bpf.Drained) error
	SetLocalPrefixes(prefixes []netip.Prefix) error
	Close() error
}

// batch is the one request in flight. It is resent byte for byte, with the
// same seq, until the server acknowledges it: see internal/wire for why
// this makes delivery exactly once.
type batch struct {
	seq   uint64
	body  []byte
	flows int
	sum   flow.Counts
}

// sendResult reports the outcome of a batch to the main loop.
type sendResult struct {
	b   *batch
	err error
}

// Agent drains one datapath and ships its counts.
type Agent struct {
	cfg         Config
	log         *slog.Logger
	dp          Datapath
	nodes       nodeGetter
	client      *remotewrite.Client
	reg         *metrics.Registry
	m           *agentMetrics
	buf         *buffer
	enc         wire.Encoder
	drained     bpf.Drained
	scratch     []flow.Record
	incarnation string
	seq         uint64
	prefixes    []netip.Prefix
	// inflight is the batch being sent, nil when none; spare is the
	// other one. Two batches alternate so that building the next never
	// touches the body being sent.
	inflight, spare *batch
	// tableWarned is when the agent last warned that the flow log
	// spilled at the size its memory flag allows.
	tableWarned time.Time
	// lastTime is the time of the last batch built: each batch's is
	// later, at the wire's millisecond precision.
	lastTime time.Time
	// routes follows the pods' host routes (Config.ReportReleases); nil
	// when releases are not reported.
	routes *hostRoutes
	// notices posts release notices, one at a time (noticeBusy), with
	// its own encoder: the main loop's is the batches'.
	notices    *remotewrite.Client
	noticeEnc  wire.Encoder
	noticeBusy atomic.Bool
}

// New wires an agent around an already loaded datapath. nodes may be nil
// when the local prefixes are given explicitly.
func New(cfg Config, dp Datapath, nodes nodeGetter, log *slog.Logger) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	inc := make([]byte, 8)
	if _, err := rand.Read(inc); err != nil {
		return nil, fmt.Errorf("choosing incarnation: %w", err)
	}
	client, err := newClient(cfg)
	if err != nil {
		return nil, err
	}
	notices, err := newNoticeClient(cfg)
	if err != nil {
		return nil, err
	}
	reg := metrics.New(metrics.Label{Name: wire.LabelNode, Value: cfg.NodeName})
	a := &Agent{
		cfg:         cfg,
		log:         log.With("component", "agent", "node", cfg.NodeName),
		dp:          dp,
		nodes:       nodes,
		client:      client,
		notices:     notices,
		reg:         reg,
		m:           newAgentMetrics(reg),
		buf:         newBuffer(cfg.MaxBufferedFlows),
		incarnation: hex.EncodeToString(inc),
		spare:       &batch{},
	}
	reg.GaugeFunc("kubezonnet_agent_buffered_flows", "Flows drained from the kernel and not yet acknowledged by the server.", func() float64 { return float64(a.m.buffered.Load()) })
	return a, nil
}

// Run sets the local prefixes and drains, merges and sends every flush
// interval until ctx ends; then it drains and sends one last time within
// the shutdown timeout. It returns nil after a clean shutdown.
func (a *Agent) Run(ctx context.Context) error {
	// The command sets the prefixes before attaching, so that the hook
	// counts from its first packet; an agent built otherwise sets them here.
	if a.prefixes == nil {
		if err := a.refreshPrefixes(ctx); err != nil {
			return err
		}
	}
	a.log.Info("agent started", "incarnation", a.incarnation, "server", a.cfg.serverWriteURL(), "prefixes", fmt.Sprint(a.prefixes), "flush_interval", a.cfg.FlushInterval)

	sendCh := make(chan *batch, 1)
	results := make(chan sendResult, 1)
	sendCtx, stopSender := context.WithCancel(context.WithoutCancel(ctx))
	defer stopSender()
	go a.sender(sendCtx, sendCh, results)

	var routeCh <-chan routeUpdate
	if a.cfg.ReportReleases {
		routeCtx, stopRoutes := context.WithCancel(ctx)
		defer stopRoutes()
		h, ch, err := watchRoutes(routeCtx, a.cfg.NetnsPath, a.isLocal, func(msg string, err error) { a.log.Warn(msg, "err", err) })
		if err != nil {
			a.log.Warn("following pod host routes: pod address releases are not reported", "err", err)
		} else {
			a.routes, routeCh = h, ch
			a.log.Info("following pod host routes to report address releases", "routes", len(h.byAddr))
		}
	}

	flush := time.NewTicker(a.cfg.FlushInterval)
	defer flush.Stop()
	var refresh <-chan time.Time
	if a.cfg.LocalPrefixes == nil {
		t := time.NewTicker(a.cfg.PrefixRefresh)
		defer t.Stop()
		refresh = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return a.shutdown(sendCh, results, stopSender)
		case <-refresh:
			if err := a.refreshPrefixes(ctx); err != nil {
				a.m.prefixErrors.Inc()
				a.log.Warn("refreshing local prefixes; keeping the previous ones", "err", err)
			}
		case <-flush.C:
			if err := a.drain(); err != nil {
				a.log.Error("draining the datapath", "err", err)
				continue
			}
			if a.inflight == nil {
				a.inflight = a.build()
				sendCh <- a.inflight
			}
		case u, ok := <-routeCh:
			if !ok {
				routeCh = nil
				continue
			}
			a.routeUpdate(u)
			if a.buf.hasSealed() && a.inflight == nil {
				a.inflight = a.build()
				sendCh <- a.inflight
			}
		case r := <-results:
			a.finish(r)
			// A release sealed while a batch was in flight goes out at
			// once, not at the next flush.
			if a.buf.hasSealed() {
				a.inflight = a.build()
				sendCh <- a.inflight
			}
		}
	}
}

// isLocal reports whether addr is in the local prefixes (a source this
// node counts).
func (a *Agent) isLocal(addr netip.Addr) bool {
	for _, p := range a.prefixes {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// routeUpdate applies route changes. The addresses whose pod went away
// are released: the kernel is drained at once, and what it held is sealed
// with the releases (buffer.seal), so that it goes out in a batch of its
// own, before anything the next pod of the address sends.
func (a *Agent) routeUpdate(u routeUpdate) {
	var rel []netip.Addr
	for _, ev := range u.events {
		rel = a.routes.apply(ev, a.isLocal, rel)
	}
	if u.lost {
		a.m.routeResyncs.Inc()
		dump, err := dumpHostRoutes(a.cfg.NetnsPath)
		if err != nil {
			a.log.Warn("route notifications were lost and the routes cannot be listed: releases meanwhile are not reported", "err", err)
		} else {
			rel = a.routes.resync(dump, a.isLocal, rel)
		}
	}
	if len(rel) == 0 {
		return
	}
	now := time.Now()
	if err := a.drain(); err != nil {
		// What was drained before still goes before the release.
		a.log.Error("draining the datapath at an address release", "err", err)
	}
	// The sealed part's batch time, fixed now so that a notice can name
	// it.
	if n := a.buf.seal(releases(rel, now), a.afterLast(now)); n > 0 {
		a.m.releasesUnordered.Add(float64(n))
		a.log.Warn("address releases merged with flows drained after them, while the server did not acknowledge: those flows may be credited to the released pods", "releases", n)
	}
	a.m.releases.Add(float64(len(rel)))
	a.log.Debug("pod addresses released", "addresses", fmt.Sprint(rel))
	if a.inflight != nil {
		a.sendNotice()
	}
}

// sendNotice posts the sealed part's releases ahead of its batch, which
// waits for the batch in flight (internal/wire, "Release notices"): one
// notice at a time, best effort (the batch carries the releases anyway).
func (a *Agent) sendNotice() {
	rels, at, ok := a.buf.peekSealed()
	if !ok || !a.noticeBusy.CompareAndSwap(false, true) {
		return
	}
	wb := wire.Batch{Node: a.cfg.NodeName, Incarnation: a.incarnation, Seq: a.seq + 1, Time: at, Released: rels}
	body := slices.Clone(a.noticeEnc.Encode(&wb))
	go func() {
		defer a.noticeBusy.Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := a.notices.Store(ctx, body); err != nil {
			a.m.noticeFailures.Inc()
			a.log.Debug("release notice not accepted; its batch carries the releases", "err", err)
			return
		}
		a.m.notices.Inc()
	}()
}

// tableWarnEvery spaces the warnings about a flow log too small for the
// packets: a node that outgrows it does so on every drain.
const tableWarnEvery = 10 * time.Minute

// drain moves the kernel's counts into the buffer.
func (a *Agent) drain() error {
	start := time.Now()
	if err := a.dp.Drain(&a.drained); err != nil {
		return err
	}
	a.m.drained(&a.drained, time.Since(start))
	if stuck := a.drained.Stuck; len(stuck) > 0 {
		// At most one line per flush interval.
		a.log.Warn("drain went on without waiting for CPUs whose kernel programs never finished; counts they wrote late may be lost", "cpus", fmt.Sprint(stuck), "waited", a.drained.Waited)
	}
	if a.drained.Spilled > 0 && time.Since(a.tableWarned) >= tableWarnEvery {
		a.tableWarned = time.Now()
		a.log.Warn("kernel flow log full at its memory bound: flows spill to the slower hash map; raise --flow-table-memory", "spilled_flows", a.drained.Spilled, "logged_packets", a.drained.Logged, "flow_table_memory_mib", a.cfg.FlowTableMemory)
	}
	if lost := a.buf.add(a.drained.Flows); !lost.IsZero() {
		a.m.dropped("buffer_full", lost)
		a.log.Warn("flow buffer full: new flows dropped", "bytes", lost.Bytes, "packets", lost.Packets, "max_buffered_flows", a.cfg.MaxBufferedFlows)
	}
	a.m.buffered.Store(int64(a.buf.len()))
	return nil
}

// afterLast returns t, or the millisecond after the last batch's time if
// t is not later: batch times increase at the wire's precision.
func (a *Agent) afterLast(t time.Time) time.Time {
	if t.UnixMilli() <= a.lastTime.UnixMilli() {
		return time.UnixMilli(a.lastTime.UnixMilli() + 1)
	}
	return t
}

// build turns the buffer into the next batch (possibly with no flows: the
// header and self-metrics still tell the server this agent is alive): its
// sealed part when there is one, stamped when it was drained, else the
// rest, stamped now.
func (a *Agent) build() *batch {
	flows, rels, at, sealed := a.buf.takeSealed()
	if !sealed {
		flows = a.buf.take(a.scratch)
		a.scratch = flows // handed back to the buffer by the next take
		at = a.afterLast(time.Now())
	}
	a.lastTime = at
	a.seq++
	b := a.spare
	a.spare = nil
	*b = batch{seq: a.seq, body: b.body[:0], flows: len(flows)}
	for _, r := range flows {
		b.sum.Add(r.Counts)
	}
	wb := wire.Batch{
		Node: a.cfg.NodeName, Incarnation: a.incarnation, Seq: a.seq,
		Time: at, Flows: flows, Released: rels, Metrics: a.wireMetrics(),
	}
	b.body = append(b.body, a.enc.Encode(&wb)...)
	a.m.buffered.Store(int64(a.buf.len() + b.flows))
	return b
}

// wireMetrics converts the self-metrics for the request (node is added by
// the encoder).
func (a *Agent) wireMetrics() []wire.Metric {
	var out []wire.Metric
	a.reg.Each(func(name string, labels []metrics.Label, v float64) {
		m := wire.Metric{Name: name, Value: v}
		for _, l := range labels {
			if l.Name != wire.LabelNode {
				m.Labels = append(m.Labels, wire.Label{Name: l.Name, Value: l.Value})
			}
		}
		out = append(out, m)
	})
	return out
}

// finish records the outcome of a batch.
func (a *Agent) finish(r sendResult) {
	a.spare = r.b
	a.inflight = nil
	if r.err == nil {
		a.m.batches.Inc()
		a.m.lastSend.Set(float64(time.Now().UnixNano()) / 1e9)
		a.m.buffered.Store(int64(a.buf.len()))
		return
	}
	// A refusal for good (4xx): resending the same bytes cannot succeed.
	a.m.rejected.Inc()
	a.m.dropped("rejected", r.b.sum)
	a.m.buffered.Store(int64(a.buf.len()))
	a.log.Error("server refused a batch; its counts are dropped", "seq", r.b.seq, "flows", r.b.flows, "bytes", r.b.sum.Bytes, "err", r.err)
}

// sender posts batches one at a time, retrying each until it is accepted,
// refused for good, or the agent gives up at shutdown.
func (a *Agent) sender(ctx context.Context, in <-chan *batch, out chan<- sendResult) {
	bo := &remotewrite.Backoff{Min: a.cfg.RetryMin, Max: a.cfg.RetryMax}
	for {
		select {
		case <-ctx.Done():
			return
		case b := <-in:
			err := sendWithRetry(ctx, a.client, bo, b.body, func(err error, wait time.Duration) {
				a.m.retries.Inc()
				a.m.failures.Inc()
				a.log.Warn("sending batch failed; retrying", "seq", b.seq, "err", err, "retry_in", wait.Round(time.Millisecond))
			})
			a.m.attempts.Add(1)
			if err != nil && errors.Is(err, context.Canceled) {
				out <- sendResult{b: b, err: err}
				return
			}
			if err != nil {
				a.m.failures.Inc()
			}
			out <- sendResult{b: b, err: err}
		}
	}
}

// shutdown drains one last time and sends everything within the timeout.
func (a *Agent) shutdown(sendCh chan *batch, results chan sendResult, stopSender func()) error {
	deadline := time.NewTimer(a.cfg.ShutdownTimeout)
	defer deadline.Stop()
	defer func() {
		if err := a.dp.Close(); err != nil {
			a.log.Error("detaching the datapath", "err", err)
		}
	}()
	drainErr := a.drain()
	giveUp := func(what string) error {
		stopSender()
		sealed, _, _, _ := a.buf.takeSealed()
		lost := append(a.buf.take(nil), sealed...)
		var sum flow.Counts
		for _, r := range lost {
			sum.Add(r.Counts)
		}
		if a.inflight != nil {
			sum.Add(a.inflight.sum)
		}
		if sum.IsZero() {
			a.log.Warn("shutdown timeout: server unreachable, but no counts were pending", "while", what)
			return nil
		}
		a.log.Error("shutdown timeout: counts not delivered", "while", what, "flows", len(lost), "bytes", sum.Bytes, "packets", sum.Packets)
		return fmt.Errorf("shutdown: %d bytes not delivered within %s", sum.Bytes, a.cfg.ShutdownTimeout)
	}
	for a.inflight != nil {
		select {
		case r := <-results:
			a.finish(r)
		case <-deadline.C:
			return giveUp("waiting for the batch in flight")
		}
	}
	// A sealed part goes in a batch of its own, then the rest.
	for more := true; more; {
		more = a.buf.hasSealed()
		a.inflight = a.build()
		sendCh <- a.inflight
		select {
		case r := <-results:
			a.finish(r)
			if r.err != nil {
				return fmt.Errorf("final batch: %w", r.err)
			}
		case <-deadline.C:
			return giveUp("sending the final batch")
		}
	}
	stopSender()
	if drainErr != nil {
		return fmt.Errorf("final drain: %w", drainErr)
	}
	a.log.Info("agent stopped", "batches", a.seq)
	return nil
}

// refreshPrefixes computes the local prefixes and pushes them to the
// kernel when they changed.
func (a *Agent) refreshPrefixes(ctx context.Context) error {
	prefixes := slices.Clone(a.cfg.LocalPrefixes)
	if prefixes == nil {
		if a.nodes == nil {
			return errors.New("local prefixes: auto mode needs access to the Kubernetes API")
		}
		getCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		n, err := a.nodes.Get(getCtx, a.cfg.NodeName, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("reading node %s from the Kubernetes API: %w", a.cfg.NodeName, err)
		}
		if prefixes, err = nodePrefixes(n); err != nil {
			return err
		}
	}
	prefixes = append(prefixes, a.cfg.ExtraLocalPrefixes...)
	if slices.Equal(prefixes, a.prefixes) {
		return nil
	}
	if err := a.dp.SetLocalPrefixes(prefixes); err != nil {
		return err
	}
	if a.prefixes != nil {
		a.log.Info("local prefixes changed", "prefixes", fmt.Sprint(prefixes))
	}
	a.prefixes = prefixes
	return nil
}

// Serve serves /metrics, /healthz and /readyz on addr until ctx ends.
func (a *Agent) Serve(ctx context.Context, addr string) error {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", a.reg.Handler())
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if a.m.lastSend.Value() == 0 {
			http.Error(w, "no batch acknowledged by the server yet", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening on --listen-address %s: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
