// Package aggregate keeps the server's cumulative counters: bytes and
// packets per pod pair, per zone pair, and per pod sent across a zone
// boundary. It is fed resolved flows by the ingest path and read as a
// remote-write Source by the push loop.
//
// The hot path is one map lookup per flow keyed by the pair of resolved
// endpoint pointers (a "route"), which caches where the flow's counts go.
// Routes are only a cache: the series themselves are found by their label
// content, so two endpoint pointers with identical labels (the resolver may
// rebuild an endpoint after an unrelated pod update) still share one
// series.
//
// Series live in a series.Store, by stable numeric ref, reused once a
// series expired and its stale marker was pushed. Refs are what makes the
// state durable (journal.go, checkpoint.go): a change is recorded as the
// series it declared (ref and labels, once) and the refs it added counts
// to, so a checkpoint is the store written out and the log replays onto it
// ref for ref. The pusher reads the store directly (EncodeSnapshot).
package aggregate

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/server/resolve"
	"github.com/kubezonnet/kubezonnet/server/series"
)

// Names of the series this package produces (the series contract).
const (
	MetricPodPairBytes    = "kubezonnet_pod_pair_bytes_total"
	MetricPodPairPackets  = "kubezonnet_pod_pair_packets_total"
	MetricZonePairBytes   = "kubezonnet_zone_pair_bytes_total"
	MetricZonePairPackets = "kubezonnet_zone_pair_packets_total"
	MetricPodCrossZone    = "pod_cross_zone_network_traffic_bytes_total"
	MetricServiceBytes    = "kubezonnet_service_bytes_total"
	MetricServicePackets  = "kubezonnet_service_packets_total"
	// Overflow is the pod label value of series that fold pod pairs beyond
	// --max-pod-pairs into their workload pair.
	Overflow = "_overflow"
)

// DefaultMaxServiceSeries bounds the workload-to-Service series unless
// configured: a workload talks to few Services, and each of its series is
// one per zone pair and avoidability.
const DefaultMaxServiceSeries = 20_000

// Config bounds and shapes the aggregation.
type Config struct {
	// AllPairs keeps pod-pair series for every class, not only the
	// billable ones and the ones whose bill cannot be told (cross-zone,
	// cross-region, external, unknown).
	AllPairs bool
	// MaxPodPairs bounds the live pod-pair series; beyond it, new pairs
	// fold into their workload pair's _overflow series.
	MaxPodPairs int
	// MaxServiceSeries bounds the live Service series of workloads;
	// beyond it, new ones fold into the Service's _overflow workload. 0
	// means DefaultMaxServiceSeries.
	MaxServiceSeries int
	// IdleTimeout expires series that received nothing for that long.
	IdleTimeout time.Duration
	// Now is the clock; nil means time.Now (tests inject theirs).
	Now func() time.Time
	// Journal, when set, receives every change (durable state); nil
	// means the counters live in memory only.
	Journal Journal
}

// Flow is one resolved flow, the unit Apply consumes; Apply never writes
// it.
type Flow struct {
	Src, Dst *resolve.Endpoint
	// Service is the Service the flow was addressed to, nil when it was
	// not sent to a Service's virtual IP the resolver knows.
	Service *resolve.Service
	// Avoidable says that the flow crossed a zone while a ready endpoint
	// of Service was in the source's zone (only with a Service).
	Avoidable bool
	flow.Counts
}

// Placement is what ApplyPlaced reports of a flow: its class
// (resolve.Classify of its endpoints) and which of its sides are unknown.
// Both are cached per endpoint pair, so that once a pair is known neither
// Apply nor its caller reads an endpoint: the endpoints of thousands of
// pods do not stay in the CPU's caches.
type Placement struct {
	Class   resolve.Class
	Unknown uint8
}

// Bits of Placement.Unknown.
const (
	SrcUnknown uint8 = 1 << iota
	DstUnknown
)

// seriesKind is what a series counts, as the store keeps it.
type seriesKind = series.Kind

const (
	kindFree                = series.Free
	kindPair     seriesKind = iota // pod pair, counted against MaxPodPairs
	kindOverflow                   // pod pairs folded into their workload pair
	kindHostPair                   // pair without a pod side: already workload-grained
	kindZone
	kindCross
	kindService       // workload to Service, counted against MaxServiceSeries
	kindServiceFolded // workloads beyond MaxServiceSeries, per Service
)

// noRef marks a route without a pair or cross series.
const noRef = ^uint32(0)

// twin reports whether a series of kind carries bytes and packets.
func twin(kind seriesKind) bool { return kind != kindCross }

// routeKey identifies a route by endpoint identity: pointer comparison and
// hashing are what make the per-flow lookup cheap.
type routeKey struct {
	src, dst *resolve.Endpoint
}

// pairRoute says where an endpoint pair's flows go (series refs; pair and
// cross may be noRef), and caches what the endpoints' labels imply: the
// placement.
type pairRoute struct {
	pair, zone, cross uint32
	Placement
}

// svcRouteKey identifies the Service series a flow feeds. Flows to a
// Service have routes of their own, so that the route of every other
// flow stays as small as its endpoint pair.
type svcRouteKey struct {
	src, dst  *resolve.Endpoint
	svc       *resolve.Service
	avoidable bool
}

// route says where one flow's counts go: its pair's route, and its
// Service series (noRef for none).
type route struct {
	pairRoute
	svc uint32
}

// Aggregator holds the counters. It is safe for concurrent use: Apply
// takes its lock once per batch.
type Aggregator struct {
	cfg Config

	mu sync.Mutex
	// walk orders what reads every series a chunk at a time, taking mu
	// per chunk (a push's capture, a checkpoint's view): one at a time.
	walk   sync.Mutex
	routes map[routeKey]pairRoute
	// svcRoutes maps the flows to a Service to their Service series.
	svcRoutes map[svcRouteKey]uint32
	store     *series.Store
	dead      []uint32 // expiry scratch
	scratch   []metrics.Label
	// delivered is the newest push (unix ms) every endpoint accepted
	// whole: series first pushed no later are known to every receiver.
	delivered int64
	// unpushed lists, while a log is replayed, the refs declared since
	// the last push marker (a push marks them pushed).
	unpushed []uint32
	// replayStrings interns label strings while a log is replayed.
	replayStrings map[string]string
	// journal state: the record being built and the refs declared in it.
	rec      []byte
	declared []uint32
	decl     series.Series // scratch for reading a declared series

	folded    *metrics.Counter
	foldedSvc *metrics.Counter
	expired   *metrics.Counter
}

// New returns an aggregator registering its self-metrics in reg.
func New(cfg Config, reg *metrics.Registry) (*Aggregator, error) {
	if cfg.MaxPodPairs <= 0 {
		return nil, fmt.Errorf("max pod pairs must be positive, got %d", cfg.MaxPodPairs)
	}
	if cfg.MaxServiceSeries < 0 {
		return nil, fmt.Errorf("max service series must not be negative, got %d", cfg.MaxServiceSeries)
	}
	if cfg.MaxServiceSeries == 0 {
		cfg.MaxServiceSeries = DefaultMaxServiceSeries
	}
	if cfg.IdleTimeout <= 0 {
		return nil, fmt.Errorf("series idle timeout must be positive, got %s", cfg.IdleTimeout)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	a := &Aggregator{
		cfg:    cfg,
		routes: map[routeKey]pairRoute{}, svcRoutes: map[svcRouteKey]uint32{},
		store: series.New(),
		foldedSvc: reg.Counter("kubezonnet_server_service_series_folded_total",
			"Workload-to-Service series folded into the Service's _overflow workload because --max-service-series was reached (counted when a route is built)."),
		folded: reg.Counter("kubezonnet_server_pod_pairs_folded_total",
			"Pod pairs folded into an _overflow series because --max-pod-pairs was reached (counted when a pair's route is built, so a pair folds again after its route was evicted)."),
		expired: reg.Counter("kubezonnet_server_series_expired_total",
			"Aggregated series removed after --series-idle-timeout without traffic."),
	}
	reg.GaugeFunc("kubezonnet_server_series", "Live aggregated series (a bytes/packets pair counts once).",
		func() float64 { return float64(a.Len()) })
	return a, nil
}

// Len returns the number of live series (a bytes/packets twin counts once).
func (a *Aggregator) Len() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.store.Len()
}

// maxRoutes bounds the route cache. Routes of untracked (same-zone) pairs
// have no series behind them, so the cache is bounded on its own and
// simply emptied when full; flows then rebuild their routes.
func (a *Aggregator) maxRoutes() int { return 2*a.cfg.MaxPodPairs + 1<<16 }

// maxServiceRoutes bounds the Service route cache the same way.
func (a *Aggregator) maxServiceRoutes() int { return 2*a.cfg.MaxServiceSeries + 1<<16 }

// Apply adds flows observed at now (the server's receive time, which is
// what idleness is measured against). With a journal, the change is
// recorded under the same lock, tagged with the agent batch id (nil for
// none), and Apply returns the record's journal position, which the
// caller waits on before acknowledging; without one it returns 0.
func (a *Aggregator) Apply(now time.Time, flows []Flow, id *BatchID) uint64 {
	return a.ApplyPlaced(now, flows, id, nil)
}

// ApplyPlaced is Apply that also reports each flow's placement in
// placed[i] (placed nil, or at least as long as flows).
func (a *Aggregator) ApplyPlaced(now time.Time, flows []Flow, id *BatchID, placed []Placement) uint64 {
	ts := now.UnixNano()
	a.mu.Lock()
	defer a.mu.Unlock()
	j := a.cfg.Journal != nil
	if j {
		a.beginBatch(len(flows))
	}
	for i := range flows {
		f := &flows[i]
		k := routeKey{f.Src, f.Dst}
		pr, ok := a.routes[k]
		if !ok || !a.live(pr) {
			if len(a.routes) >= a.maxRoutes() {
				clear(a.routes)
			}
			pr = a.newRoute(f, ts)
			a.routes[k] = pr
		}
		r := route{pairRoute: pr, svc: noRef}
		if f.Service != nil && f.Src.Kind == resolve.KindPod {
			sk := svcRouteKey{f.Src, f.Dst, f.Service, f.Avoidable}
			if r.svc, ok = a.svcRoutes[sk]; !ok || a.isFree(r.svc) {
				if len(a.svcRoutes) >= a.maxServiceRoutes() {
					clear(a.svcRoutes)
				}
				r.svc = a.newServiceRoute(f, pr.Class, ts)
				a.svcRoutes[sk] = r.svc
			}
		}
		if placed != nil {
			placed[i] = r.Placement
		}
		a.add(r, f.Counts, ts)
		if j {
			a.recordFlow(r, f.Counts)
		}
	}
	if !j {
		return 0
	}
	return a.endBatch(id, now)
}

// add adds c to the series of route r.
func (a *Aggregator) add(r route, c flow.Counts, ts int64) {
	a.store.Add(r.zone, c.Bytes, c.Packets, ts)
	if r.pair != noRef {
		a.store.Add(r.pair, c.Bytes, c.Packets, ts)
	}
	if r.cross != noRef {
		a.store.Add(r.cross, c.Bytes, 0, ts)
	}
	if r.svc != noRef {
		a.store.Add(r.svc, c.Bytes, c.Packets, ts)
	}
}

// tracked reports whether a class gets pod-pair series.
func (a *Aggregator) tracked(class resolve.Class) bool {
	if a.cfg.AllPairs {
		return true
	}
	// Unknown pairs are tracked: a pod sending to a private address
	// outside the cluster (a peered network, an on-premises range) may
	// be billed, and only the pair says which pod it is.
	return class != resolve.ClassSameZone
}

// newRoute finds or creates the series a new endpoint pair feeds.
func (a *Aggregator) newRoute(f *Flow, ts int64) pairRoute {
	class := resolve.Classify(f.Src, f.Dst)
	r := pairRoute{pair: noRef, cross: noRef, Placement: Placement{Class: class}}
	if f.Src.Kind == resolve.KindUnknown {
		r.Unknown |= SrcUnknown
	}
	if f.Dst.Kind == resolve.KindUnknown {
		r.Unknown |= DstUnknown
	}
	a.scratch = zoneLabels(a.scratch[:0], MetricZonePairBytes, f.Src.Zone, f.Dst.Zone)
	r.zone = a.findOrCreate(kindZone, ts)
	if a.tracked(class) {
		a.scratch = pairLabels(a.scratch[:0], MetricPodPairBytes, f, class, false)
		hasPod := f.Src.Kind == resolve.KindPod || f.Dst.Kind == resolve.KindPod
		if ref, ok := a.find(); ok {
			r.pair = ref
		} else if !hasPod {
			// Nodes, static endpoints and the internet are few: such
			// pairs need no folding and do not use up pod-pair slots.
			r.pair = a.create(kindHostPair, ts)
		} else if a.store.Count(kindPair) < a.cfg.MaxPodPairs {
			r.pair = a.create(kindPair, ts)
		} else {
			a.folded.Inc()
			a.scratch = pairLabels(a.scratch[:0], MetricPodPairBytes, f, class, true)
			r.pair = a.findOrCreate(kindOverflow, ts)
		}
	}
	if class.CrossesZone() && f.Src.Kind == resolve.KindPod {
		a.scratch = append(a.scratch[:0],
			metrics.Label{Name: "__name__", Value: MetricPodCrossZone},
			metrics.Label{Name: "namespace", Value: f.Src.Namespace},
			metrics.Label{Name: "pod", Value: f.Src.Pod})
		a.scratch = dropEmpty(a.scratch)
		r.cross = a.findOrCreate(kindCross, ts)
	}
	return r
}

// newServiceRoute finds or creates the Service series of a flow from a
// pod to f.Service, whose endpoint pair is of class.
func (a *Aggregator) newServiceRoute(f *Flow, class resolve.Class, ts int64) uint32 {
	avoidable := f.Avoidable && class.CrossesZone()
	a.scratch = serviceLabels(a.scratch[:0], MetricServiceBytes, f, avoidable, false)
	if ref, ok := a.find(); ok {
		return ref
	}
	if a.store.Count(kindService) < a.cfg.MaxServiceSeries {
		return a.create(kindService, ts)
	}
	a.foldedSvc.Inc()
	a.scratch = serviceLabels(a.scratch[:0], MetricServiceBytes, f, avoidable, true)
	return a.findOrCreate(kindServiceFolded, ts)
}

// findOrCreate returns the ref of the series labelled a.scratch, creating
// it.
func (a *Aggregator) findOrCreate(kind seriesKind, ts int64) uint32 {
	if ref, ok := a.find(); ok {
		return ref
	}
	return a.create(kind, ts)
}

// find returns the ref of the live series labelled a.scratch.
func (a *Aggregator) find() (uint32, bool) {
	return a.store.Lookup(a.scratch)
}

// create makes the series labelled a.scratch (its bytes name for twins).
func (a *Aggregator) create(kind seriesKind, ts int64) uint32 {
	ref := a.store.Create(kind, a.scratch, packetsName(kind, a.scratch), ts/int64(time.Millisecond), ts)
	if a.cfg.Journal != nil {
		a.declared = append(a.declared, ref)
	}
	return ref
}

// packetsName returns the packets twin's name of a series of kind
// labelled ls, "" for a series without one.
func packetsName(kind seriesKind, ls []metrics.Label) string {
	if !twin(kind) {
		return ""
	}
	switch ls[0].Value {
	case MetricPodPairBytes:
		return MetricPodPairPackets
	case MetricZonePairBytes:
		return MetricZonePairPackets
	case MetricServiceBytes:
		return MetricServicePackets
	}
	panic("aggregate: no packets twin for " + ls[0].Value)
}

// AppendSeries implements remotewrite.Source, as a view for tests and
// debugging: it first expires idle series, then appends every live one
// with its cumulative value and, for the series a receiver may not have
// yet, its creation time, marking nothing pushed. The pusher reads the
// store through EncodeSnapshot instead.
func (a *Aggregator) AppendSeries(dst []remotewrite.Series) []remotewrite.Series {
	now := a.cfg.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.expireLocked(now)
	var s series.Series
	a.store.EachLive(func(ref uint32) {
		a.store.Get(ref, &s)
		created, mayExist := a.store.Zero(ref, a.delivered)
		lab := append([]metrics.Label(nil), s.Labels...)
		dst = append(dst, remotewrite.Series{Labels: lab, Value: float64(s.Bytes), Created: created, MayExist: mayExist})
		if p := packetsName(s.Kind, lab); p != "" {
			pl := append([]metrics.Label(nil), lab...)
			pl[0].Value = p
			dst = append(dst, remotewrite.Series{Labels: pl, Value: float64(s.Packets), Created: created, MayExist: mayExist})
		}
	})
	return dst
}

// EncodeSnapshot implements remotewrite.EncodingSource: it expires idle
// series and captures every live one's value, taking the lock for one
// chunk of series at a time (and, with a journal, makes the record of
// first pushes durable before anything leaves), then encodes without the
// lock, so ingest goes on while a million series are read and written.
func (a *Aggregator) EncodeSnapshot(ts int64, w *remotewrite.SnapshotWriter) {
	a.capture(ts).Encode(w)
}

// capture is EncodeSnapshot's part that reads the series: it records ts
// as the first push of the series it holds for the first time (and, with
// a journal, logs that where the series it holds end: before any
// declared while it walks), so that Delivered can tell which series
// every receiver has.
func (a *Aggregator) capture(ts int64) *series.Capture {
	a.walk.Lock()
	defer a.walk.Unlock()
	a.expire(a.cfg.Now())
	a.mu.Lock()
	c, newly := a.store.StartCapture(ts, a.delivered)
	var pos uint64
	if newly && a.cfg.Journal != nil {
		pos = a.cfg.Journal.Append(appendPushed(nil, ts), nil)
	}
	a.mu.Unlock()
	c.Walk(&a.mu)
	if pos != 0 {
		// The record of first pushes is durable before the push's
		// requests leave. A failed log is the ingest path's to report.
		_ = a.cfg.Journal.Wait(context.Background(), pos)
	}
	return c
}

// Delivered records that the push stamped ts (unix ms) reached every
// endpoint whole: the series it held are known to every receiver, which a
// restart needs to know (it must not send them a zero sample older than
// what the receiver holds). It is the pusher's OnDelivered callback.
func (a *Aggregator) Delivered(ts int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if ts <= a.delivered {
		return
	}
	a.delivered = ts
	if a.cfg.Journal != nil {
		a.cfg.Journal.Append(appendDelivered(nil, ts), nil)
	}
}

// Expire removes series idle for longer than the idle timeout at now.
func (a *Aggregator) Expire(now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.expireLocked(now)
}

func (a *Aggregator) expireLocked(now time.Time) {
	cutoff := now.Add(-a.cfg.IdleTimeout).UnixNano()
	if a.noteExpired(now, a.store.Expire(cutoff, a.dead[:0])) {
		a.dropRoutes(nil)
	}
}

// expire is expireLocked a chunk of series per hold of the lock, as a
// push's capture runs it: with a million series neither the pass over
// them nor the one over the routes holds ingest up. A route to a series
// expired and not dropped yet is not used meanwhile (ApplyPlaced checks).
func (a *Aggregator) expire(now time.Time) {
	cutoff := now.Add(-a.cfg.IdleTimeout).UnixNano()
	died := false
	for ci := 0; ; ci++ {
		a.mu.Lock()
		if ci >= a.store.Chunks() {
			if died {
				a.dropRoutes(&a.mu) // unlocks
				return
			}
			a.mu.Unlock()
			return
		}
		died = a.noteExpired(now, a.store.ExpireChunk(ci, cutoff, a.dead[:0])) || died
		a.mu.Unlock()
	}
}

// noteExpired counts and logs the expiry of dead, reporting whether
// there was any.
func (a *Aggregator) noteExpired(now time.Time, dead []uint32) bool {
	a.dead = dead[:0]
	if len(dead) == 0 {
		return false
	}
	a.expired.Add(float64(len(dead)))
	if a.cfg.Journal != nil {
		a.cfg.Journal.Append(appendExpire(nil, now, dead), nil)
	}
	return true
}

// routeChunk is how many routes dropRoutes checks per hold of the lock.
const routeChunk = 4096

// dropRoutes drops the routes that point at an expired series. A route
// is idle whenever every series it feeds is, so that loses nothing
// live. Called with the lock held; with mu, it releases mu every
// routeChunk routes and returns with it released (the map may change in
// between, which ranging over it allows).
func (a *Aggregator) dropRoutes(mu *sync.Mutex) {
	n := 0
	yield := func() {
		if n++; mu != nil && n%routeChunk == 0 {
			mu.Unlock()
			mu.Lock()
		}
	}
	for k, r := range a.routes {
		if !a.live(r) {
			delete(a.routes, k)
		}
		yield()
	}
	for k, ref := range a.svcRoutes {
		if a.isFree(ref) {
			delete(a.svcRoutes, k)
		}
		yield()
	}
	if mu != nil {
		mu.Unlock()
	}
}

// isFree reports whether ref, a series of a route, is expired.
func (a *Aggregator) isFree(ref uint32) bool { return ref != noRef && a.store.Kind(ref) == kindFree }

// live reports whether every series of r is live: a route to an expired
// series is dropped, or replaced when its pair talks again.
func (a *Aggregator) live(r pairRoute) bool {
	return !a.isFree(r.zone) && !a.isFree(r.pair) && !a.isFree(r.cross)
}
