package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"mime"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/wire"
	"github.com/kubezonnet/kubezonnet/server/aggregate"
	"github.com/kubezonnet/kubezonnet/server/flowlog"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// Resolver is what ingest needs of server/resolve.Resolver: endpoints for
// addresses at the time a flow was seen, the node an address belongs to
// (to refuse flows an agent may not report) and whether it awaits a new
// pod (to hold a batch back until the informer shows it), and whether
// its informers have synced (before that, batches are refused so agents
// send them again instead of having every pod resolved as unknown).
type Resolver interface {
	// Lookup resolves ip for a flow at time at that node's agent
	// reported; Released records a release that node's agent saw, which
	// orders its later flows after it.
	Lookup(ip netip.Addr, at time.Time, node string) (ep *resolve.Endpoint, awaiting bool)
	Released(ip netip.Addr, node string, released, at time.Time) bool
	// Service returns the Service whose virtual IP and port dst was at
	// time at, nil for none; ReadyInZone whether it had a ready endpoint
	// in zone then.
	Service(dst netip.AddrPort, proto uint8, at time.Time) *resolve.Service
	ReadyInZone(svc *resolve.Service, zone string, at time.Time) (ready, hinted bool)
	HasSynced() bool
}

// Reasons a request is refused: values of the reason label of
// kubezonnet_server_ingest_rejected_total.
const (
	reasonMethod          = "method"
	reasonContentType     = "content_type"
	reasonContentEncoding = "content_encoding"
	reasonUnauthenticated = "unauthenticated"
	reasonForbidden       = "forbidden"
	reasonAuthUnavailable = "auth_unavailable"
	reasonBodyTooLarge    = "body_too_large"
	reasonLimit           = "limit"
	reasonMalformed       = "malformed"
	reasonNodeMismatch    = "node_mismatch"
	reasonRead            = "read_error"
	reasonNotSynced       = "not_synced"
	reasonShuttingDown    = "shutting_down"
	reasonNotDurable      = "not_durable"
	reasonAwaitingPod     = "awaiting_pod"
)

var rejectReasons = []string{
	reasonMethod, reasonContentType, reasonContentEncoding, reasonUnauthenticated, reasonForbidden,
	reasonAuthUnavailable, reasonBodyTooLarge, reasonLimit, reasonMalformed, reasonNodeMismatch, reasonRead,
	reasonNotSynced, reasonShuttingDown, reasonNotDurable, reasonAwaitingPod,
}

// Status codes the handler answers, pre-registered so the hot path only
// looks counters up.
var ingestCodes = []int{
	http.StatusNoContent, http.StatusBadRequest, http.StatusUnauthorized, http.StatusForbidden,
	http.StatusMethodNotAllowed, http.StatusRequestEntityTooLarge, http.StatusUnsupportedMediaType,
	http.StatusServiceUnavailable,
}

var unresolvedReasons = []string{
	resolve.ReasonNoPod, resolve.ReasonNoZone, resolve.ReasonNoNode, resolve.ReasonNotSynced,
	resolve.ReasonInvalidAddress, "other",
}

// Durability is what ingest needs of the state directory: to wait until a
// batch's journal record is durable before acknowledging it. Nil means
// the server is not durable (no --state-dir).
type Durability interface {
	Wait(ctx context.Context, pos uint64) error
}

// IngestConfig configures the ingest handler.
type IngestConfig struct {
	// MaxBodyBytes bounds the compressed request body (413 beyond).
	MaxBodyBytes int64
	// Limits bound the decoded request (413 beyond).
	Limits wire.Limits
}

// Ingest is the POST /api/v1/write handler (and wire.ReleasesPath's, for
// release notices): it authenticates, decodes,
// de-duplicates, resolves, aggregates and logs one agent batch per request.
type Ingest struct {
	cfg    IngestConfig
	res    Resolver
	agg    *aggregate.Aggregator
	flog   *flowlog.Logger // nil: no flow logs
	auth   authenticator
	dedup  *dedup
	agents *agentMetrics
	log    *slog.Logger
	now    func() time.Time
	state  Durability // nil: not durable

	pool sync.Pool // *work
	// order has a batch's flows resolved after the releases of the
	// requests that entered before it was decoded, waiting at most
	// orderWait.
	order     *arrivals
	orderWait time.Duration

	// Draining: once set, requests are refused with 503 (agents keep
	// their batches and send them to the next server); active counts
	// requests being handled, idle is closed when it drops to zero
	// while draining.
	mu       sync.Mutex
	draining bool
	active   int
	idle     chan struct{}

	codes      map[int]*metrics.Counter
	rejected   map[string]*metrics.Counter
	unresolved map[string]*metrics.Counter
	foreign    *metrics.Counter
	noService  *metrics.Counter
	// releases counts the released addresses agents reported: recorded,
	// or ignored (no pod of the reporting node held the address then);
	// notices the release notices.
	releases, releasesIgnored, notices *metrics.Counter
	// orderTimeouts counts batches resolved before an earlier request
	// recorded its releases (releaseOrderWait ran out).
	orderTimeouts *metrics.Counter
	batches       *metrics.Counter
	flows         *metrics.Counter
	flowBytes     *metrics.Counter
}

// work is the per-request scratch state, pooled: a decoder with its
// buffers, the batch, and the resolved flows.
type work struct {
	body  bytes.Buffer
	dec   wire.Decoder
	batch wire.Batch
	flows []aggregate.Flow
	// index holds, for each of flows, its position in batch.Flows (the
	// flows of another node's sources are left out), and placed what the
	// aggregator placed it as.
	index  []int32
	placed []aggregate.Placement
	// released is what recordReleases made of the batch's releases,
	// counted when the batch is applied.
	released releaseCounts
}

// maxPooledBody: a rare huge request's buffer is not kept for reuse.
const maxPooledBody = 8 << 20

// ingestDeps are what the ingest handler works with, built by newServer.
type ingestDeps struct {
	res    Resolver
	agg    *aggregate.Aggregator
	flog   *flowlog.Logger // nil: no flow log
	auth   authenticator
	dedup  *dedup
	agents *agentMetrics
	reg    *metrics.Registry
	log    *slog.Logger
}

func newIngest(cfg IngestConfig, d ingestDeps) *Ingest {
	reg := d.reg
	in := &Ingest{
		cfg: cfg, res: d.res, agg: d.agg, flog: d.flog, auth: d.auth, dedup: d.dedup, agents: d.agents, log: d.log, now: time.Now,
		codes:      map[int]*metrics.Counter{},
		rejected:   map[string]*metrics.Counter{},
		unresolved: map[string]*metrics.Counter{},
		foreign: reg.Counter("kubezonnet_server_flows_dropped_total",
			"Flows dropped: foreign_source is a flow whose source belongs to another node than the reporting agent's.",
			metrics.Label{Name: "reason", Value: "foreign_source"}),
		noService: reg.Counter("kubezonnet_server_flows_without_service_total",
			"Flows whose packets were destination-NATed from an address no Service known to the server held (kube-proxy's rules ahead of the informer, or NAT other than a Service's); their bytes count in the pairs, not in kubezonnet_service_*."),
		releases: reg.Counter("kubezonnet_server_address_releases_total",
			"Pod addresses that agents reported released, by result: recorded (that node's later flows of the address wait for the next pod rather than go to the released one), or ignored (no pod of the reporting node held the address at the batch's time, as far as the informer shows, or a later release was recorded).",
			metrics.Label{Name: "result", Value: "recorded"}),
		releasesIgnored: reg.Counter("kubezonnet_server_address_releases_total", "",
			metrics.Label{Name: "result", Value: "ignored"}),
		notices: reg.Counter("kubezonnet_server_release_notices_total", "Release notices accepted on "+wire.ReleasesPath+" (an agent's releases sent ahead of the batch that carries them)."),
		orderTimeouts: reg.Counter("kubezonnet_server_release_order_timeouts_total",
			"Batches whose flows were resolved before a request that reached the server before they were decoded had recorded its address releases (it was still being read or decoded after the wait's bound): their flows to an address that request released may go to the released pod."),
		order:     newArrivals(),
		orderWait: releaseOrderWait,
		batches:   reg.Counter("kubezonnet_server_batches_applied_total", "Agent batches applied (duplicates excluded)."),
		flows:     reg.Counter("kubezonnet_server_flows_total", "Flows applied from agent batches."),
		flowBytes: reg.Counter("kubezonnet_server_flow_bytes_total", "Bytes of the flows applied from agent batches."),
	}
	for _, c := range ingestCodes {
		in.codes[c] = reg.Counter("kubezonnet_server_ingest_requests_total", "Ingest requests by response status code.",
			metrics.Label{Name: "code", Value: strconv.Itoa(c)})
	}
	for _, r := range rejectReasons {
		in.rejected[r] = reg.Counter("kubezonnet_server_ingest_rejected_total", "Ingest requests refused, by reason.",
			metrics.Label{Name: "reason", Value: r})
	}
	for _, r := range unresolvedReasons {
		in.unresolved[r] = reg.Counter("kubezonnet_server_unresolved_total",
			"Flow endpoints (source or destination) resolved to unknown, by reason.",
			metrics.Label{Name: "reason", Value: r})
	}
	in.pool.New = func() any { return &work{dec: wire.Decoder{Limits: cfg.Limits}} }
	in.idle = make(chan struct{})
	return in
}

// begin counts a request in, unless the handler is draining.
func (in *Ingest) begin() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.draining {
		return false
	}
	in.active++
	return true
}

func (in *Ingest) end() {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.active--
	if in.draining && in.active == 0 {
		close(in.idle)
	}
}

// Drain makes every new request be refused with 503 and waits until the
// requests being handled have been answered, or ctx ends. What it refuses
// is not lost: agents keep a batch until a server acknowledges it.
func (in *Ingest) Drain(ctx context.Context) error {
	in.mu.Lock()
	if !in.draining {
		in.draining = true
		if in.active == 0 {
			close(in.idle)
		}
	}
	in.mu.Unlock()
	select {
	case <-in.idle:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for in-flight ingest requests: %w", ctx.Err())
	}
}

// ServeHTTP handles one agent request. Every refusal is answered with a
// plain-text message saying what was wrong and counted; nothing of a
// refused request is applied.
func (in *Ingest) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !in.begin() {
		w.Header().Set("Retry-After", "5")
		in.refuse(w, http.StatusServiceUnavailable, reasonShuttingDown, "server shutting down: send again shortly")
		return
	}
	defer in.end()
	seq := in.order.enter()
	defer in.order.recorded(seq) // a notice, or refused before its releases count
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		in.refuse(w, http.StatusMethodNotAllowed, reasonMethod, "method %s not allowed, use POST", r.Method)
		return
	}
	// Remote-write 1.0 only: 2.0 uses the same media type with
	// proto=io.prometheus.write.v2.Request, which this decoder would
	// misread.
	if mt, params, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != remotewrite.ContentType ||
		(params["proto"] != "" && params["proto"] != "prometheus.WriteRequest") {
		in.refuse(w, http.StatusUnsupportedMediaType, reasonContentType,
			"content type %q not supported, want %s (remote-write 1.0)", r.Header.Get("Content-Type"), remotewrite.ContentType)
		return
	}
	if ce := r.Header.Get("Content-Encoding"); ce != remotewrite.ContentEncoding {
		in.refuse(w, http.StatusUnsupportedMediaType, reasonContentEncoding,
			"content encoding %q not supported, want %s", ce, remotewrite.ContentEncoding)
		return
	}
	if !in.res.HasSynced() {
		// A server just started: pods are not indexed yet. Agents keep
		// the batch and resend it; applying it now would resolve every
		// address to unknown and lose its attribution for good.
		w.Header().Set("Retry-After", "1")
		in.refuse(w, http.StatusServiceUnavailable, reasonNotSynced,
			"resolver informers not synced yet: send again shortly")
		return
	}
	id, err := in.auth.authenticate(r.Context(), r)
	if err != nil {
		switch {
		case errors.Is(err, errAuthUnavailable):
			in.refuse(w, http.StatusServiceUnavailable, reasonAuthUnavailable, "%v", err)
		case errors.Is(err, errForbidden):
			in.refuse(w, http.StatusForbidden, reasonForbidden, "%v", err)
		default:
			w.Header().Set("WWW-Authenticate", `Bearer realm="kubezonnet"`)
			in.refuse(w, http.StatusUnauthorized, reasonUnauthenticated, "%v", err)
		}
		return
	}

	wk := in.pool.Get().(*work)
	defer in.release(wk)
	wk.body.Reset()
	if _, err := wk.body.ReadFrom(http.MaxBytesReader(w, r.Body, in.cfg.MaxBodyBytes)); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			in.refuse(w, http.StatusRequestEntityTooLarge, reasonBodyTooLarge,
				"request body exceeds %d bytes", tooBig.Limit)
			return
		}
		in.refuse(w, http.StatusBadRequest, reasonRead, "reading request body: %v", err)
		return
	}
	b := &wk.batch
	if err := wk.dec.Decode(wk.body.Bytes(), b); err != nil {
		if errors.Is(err, wire.ErrTooLarge) {
			in.refuse(w, http.StatusRequestEntityTooLarge, reasonLimit, "%v", err)
		} else {
			in.refuse(w, http.StatusBadRequest, reasonMalformed, "%v", err)
		}
		return
	}
	if !id.mayReport(b.Node) {
		in.refuse(w, http.StatusForbidden, reasonNodeMismatch,
			"credentials of node %q may not report for node %q", id.node, b.Node)
		return
	}
	if r.URL.Path == wire.ReleasesPath {
		in.notice(w, b)
		return
	}
	// The releases first, before anything else of the batch can wait:
	// another node's batch decoded meanwhile orders its flows of these
	// addresses after them (a batch held below, or one waiting for the
	// CPU behind others, would otherwise leave them to the released
	// pods). Counted once, when the batch is applied.
	wk.released = in.recordReleases(b)
	in.order.recorded(seq)
	// And those of the requests that reached the server before this one
	// was decoded (another node's report of a release, sent before the
	// flows here to the address's next pod).
	if len(b.Flows) > 0 && !in.order.waitEntered(r.Context(), in.orderWait) {
		in.orderTimeouts.Inc()
	}
	if ip, hold := in.screen(wk); hold {
		// The address was released by its pod a moment ago and the
		// informer shows no new pod for it yet, though the batch has
		// traffic of it since: applied now, the flows would go to the
		// deleted pod. The reuse window bounds the wait.
		w.Header().Set("Retry-After", "1")
		in.refuse(w, http.StatusServiceUnavailable, reasonAwaitingPod,
			"address %s was released by its pod and a new pod for it is not known yet: send again shortly", ip)
		return
	}
	now := in.now()
	t, fresh := in.dedup.claim(b.Node, b.Incarnation, b.Seq, now)
	var pos uint64
	switch {
	case fresh:
		pos = in.apply(wk, now)
		t.applied(pos)
	case t != nil && in.state != nil:
		// A retry: acknowledged once the original is durable.
		select {
		case <-t.done:
			pos = t.pos
		case <-r.Context().Done():
			in.refuse(w, http.StatusServiceUnavailable, reasonNotDurable, "request cancelled while its batch was applied")
			return
		}
	}
	if in.state != nil {
		if err := in.state.Wait(r.Context(), pos); err != nil {
			// Applied in memory, but a crash could lose it: not
			// acknowledged. The agent's retry waits for the same record.
			w.Header().Set("Retry-After", "5")
			in.refuse(w, http.StatusServiceUnavailable, reasonNotDurable, "batch not durable: %v", err)
			return
		}
	}
	in.codes[http.StatusNoContent].Inc()
	w.WriteHeader(http.StatusNoContent)
}

func (in *Ingest) release(wk *work) {
	if wk.body.Cap() > maxPooledBody {
		return
	}
	clear(wk.flows) // do not pin endpoints from the pool
	wk.flows = wk.flows[:0]
	in.pool.Put(wk)
}

// refuse answers a request with code and a message, and counts it.
func (in *Ingest) refuse(w http.ResponseWriter, code int, reason, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	in.codes[code].Inc()
	in.rejected[reason].Inc()
	in.log.Debug("ingest request refused", "code", code, "reason", reason, "msg", msg)
	http.Error(w, msg, code)
}

// screen resolves a batch's flows before anything of it is applied,
// into wk.flows (wk.index holding each one's position in the batch). It
// leaves out the flows whose source address belongs to another node
// (which reports them itself, or they are spoofed), and reports hold with
// an address that awaits its new pod (Resolver.Lookup): a source of the
// agent's own node, or any destination.
func (in *Ingest) screen(wk *work) (ip netip.Addr, hold bool) {
	b := &wk.batch
	flows, index := wk.flows[:0], wk.index[:0]
	defer func() { wk.flows, wk.index = flows, index }()
	for i := range b.Flows {
		f := &b.Flows[i]
		src, srcAwaits := in.res.Lookup(f.Src, b.Time, b.Node)
		if src.Node != "" && src.Node != b.Node {
			continue
		}
		dst, dstAwaits := in.res.Lookup(f.Dst, b.Time, b.Node)
		switch {
		case srcAwaits && src.Node != "":
			return f.Src, true
		case dstAwaits:
			return f.Dst, true
		}
		af := aggregate.Flow{Src: src, Dst: dst, Counts: f.Counts}
		if f.OrigDst.IsValid() {
			af.Service, af.Avoidable = in.service(f, src, dst, b.Time)
		}
		flows = append(flows, af)
		index = append(index, int32(i))
	}
	return netip.Addr{}, false
}

// service returns the Service a destination-NATed flow was addressed to,
// and whether crossing to dst's zone was avoidable: a ready endpoint of
// the Service was in src's zone at the flow's time. A flow to an address
// no Service held is counted, and aggregated without a Service.
func (in *Ingest) service(f *flow.Record, src, dst *resolve.Endpoint, at time.Time) (*resolve.Service, bool) {
	svc := in.res.Service(f.OrigDst, f.Proto, at)
	if svc == nil {
		in.noService.Inc()
		return nil, false
	}
	// Only a pod's flow to another zone can be avoidable (the aggregator
	// keeps Service series of pods, and judges the crossing by the pair's
	// class): the readiness lookup is skipped for the rest.
	if src.Zone == dst.Zone || src.Kind != resolve.KindPod {
		return svc, false
	}
	ready, _ := in.res.ReadyInZone(svc, src.Zone, at)
	return svc, ready
}

// apply aggregates and logs the flows screen resolved of a claimed
// batch; the aggregator reports each flow's class and unknown sides,
// cached per endpoint pair.
func (in *Ingest) apply(wk *work, now time.Time) uint64 {
	b := &wk.batch
	flows, index := wk.flows, wk.index
	var bytes uint64
	foreign := uint64(len(b.Flows) - len(index))
	at := b.Time
	for i := range flows {
		bytes += flows[i].Bytes
	}
	placed := slices.Grow(wk.placed[:0], len(flows))[:len(flows)]
	pos := in.agg.ApplyPlaced(now, flows, &aggregate.BatchID{Node: b.Node, Incarnation: b.Incarnation, Seq: b.Seq}, placed)
	wk.flows, wk.placed = flows, placed

	var logged *flowlog.Batch
	if in.flog.Any() {
		logged = in.flog.Buffer()
	}
	for i := range flows {
		f, p := &flows[i], placed[i]
		if p.Unknown != 0 {
			if p.Unknown&aggregate.SrcUnknown != 0 {
				in.countUnresolved(f.Src)
			}
			if p.Unknown&aggregate.DstUnknown != 0 {
				in.countUnresolved(f.Dst)
			}
		}
		if in.flog.Enabled(p.Class) {
			logged.Events = append(logged.Events, flowlog.Event{Time: at, Node: b.Node, Src: f.Src, Dst: f.Dst,
				Record: b.Flows[index[i]], Class: p.Class, Service: f.Service, Avoidable: f.Avoidable})
		}
	}
	if logged != nil {
		in.flog.Send(logged)
	}
	// Recorded when the batch was decoded; counted now, once.
	in.countReleases(wk.released)
	in.agents.update(b.Node, b.Metrics, now)
	in.batches.Inc()
	if len(flows) > 0 {
		in.flows.Add(float64(len(flows)))
		in.flowBytes.Add(float64(bytes))
	}
	if foreign > 0 {
		in.foreign.Add(float64(foreign))
	}
	return pos
}

// releaseCounts are a request's releases by what the resolver made of
// them.
type releaseCounts struct{ recorded, ignored int }

// recordReleases hands the releases a batch or a notice reports to the
// resolver (the same release again is a no-op there).
func (in *Ingest) recordReleases(b *wire.Batch) releaseCounts {
	var c releaseCounts
	for _, r := range b.Released {
		if in.res.Released(r.Addr, b.Node, r.Time, b.Time) {
			c.recorded++
		} else {
			c.ignored++
		}
	}
	return c
}

// countReleases adds c to the releases metric.
func (in *Ingest) countReleases(c releaseCounts) {
	in.releases.Add(float64(c.recorded))
	in.releasesIgnored.Add(float64(c.ignored))
}

// notice records the releases of a release notice (wire.ReleasesPath) and
// applies nothing else: an agent sends one while its batch in flight
// keeps the batch that carries them waiting, so that the server learns of
// the release at once.
func (in *Ingest) notice(w http.ResponseWriter, b *wire.Batch) {
	if len(b.Flows) > 0 {
		in.refuse(w, http.StatusBadRequest, reasonMalformed,
			"a release notice carries no flows (%d here): flows go to /api/v1/write", len(b.Flows))
		return
	}
	in.countReleases(in.recordReleases(b))
	in.notices.Inc()
	in.codes[http.StatusNoContent].Inc()
	w.WriteHeader(http.StatusNoContent)
}

func (in *Ingest) countUnresolved(ep *resolve.Endpoint) {
	c, ok := in.unresolved[ep.Reason]
	if !ok {
		c = in.unresolved["other"]
	}
	c.Inc()
}
