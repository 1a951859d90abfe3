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
// series. Label slices are built once, when a series is created, and never
// change afterwards, so the pusher may keep them.
//
// Series live in one slice indexed by a stable numeric ref, reused once a
// series expired. Refs are what makes the state durable (journal.go,
// checkpoint.go): a change is recorded as the series it declared (ref and
// labels, once) and the refs it added counts to, so a checkpoint is the
// slice written out and the log replays onto it ref for ref.
package aggregate

import (
	"context"
	"fmt"
	"hash/maphash"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// Names of the series this package produces (the series contract).
const (
	MetricPodPairBytes    = "kubezonnet_pod_pair_bytes_total"
	MetricPodPairPackets  = "kubezonnet_pod_pair_packets_total"
	MetricZonePairBytes   = "kubezonnet_zone_pair_bytes_total"
	MetricZonePairPackets = "kubezonnet_zone_pair_packets_total"
	MetricPodCrossZone    = "pod_cross_zone_network_traffic_bytes_total"
	// Overflow is the pod label value of series that fold pod pairs beyond
	// --max-pod-pairs into their workload pair.
	Overflow = "_overflow"
)

// Config bounds and shapes the aggregation.
type Config struct {
	// AllPairs keeps pod-pair series for every class, not only the
	// billable ones and the ones whose bill cannot be told (cross-zone,
	// cross-region, external, unknown).
	AllPairs bool
	// MaxPodPairs bounds the live pod-pair series; beyond it, new pairs
	// fold into their workload pair's _overflow series.
	MaxPodPairs int
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
	flow.Counts
}

// Placement is what ApplyPlaced reports of a flow: its class
// (resolve.Classify of its endpoints) and which of its sides are unknown.
// Both are cached per endpoint pair, so that once a pair is known neither
// Apply nor its caller reads an endpoint: the endpoints of thousands of
// pods do not stay in the CPU's caches, and reading them per flow made
// ingest markedly slower (BenchmarkIngestPath, BENCHMARKS.md).
type Placement struct {
	Class   resolve.Class
	Unknown uint8
}

// Bits of Placement.Unknown.
const (
	SrcUnknown uint8 = 1 << iota
	DstUnknown
)

type seriesKind uint8

const (
	kindFree seriesKind = iota // a free slot
	kindPair                   // pod pair, counted against MaxPodPairs
	kindOverflow
	kindHostPair // pair without a pod side: already workload-grained
	kindZone
	kindCross
	numKinds
)

// noRef marks a route without a pair or cross series.
const noRef = ^uint32(0)

// series is one counter (or a bytes/packets twin). The twin's two label
// slices are separate allocations on purpose: 14 labels are 448 bytes, a
// size class of their own, while one 896-byte block of pointerful labels
// gets an 8-byte malloc header and lands in the 1024-byte class.
type series struct {
	lab     []metrics.Label // bytes (or only) labels
	pkts    []metrics.Label // packets labels of twins, nil otherwise
	bytes   uint64
	packets uint64
	last    int64 // unix nanoseconds of the last update
	created int64 // unix milliseconds of the series' creation
	kind    seriesKind
	// pushed is the stamp (unix ms) of the first push snapshot that held
	// the series, 0 before. Once a push at least that new reached every
	// endpoint (delivered), every receiver has the series: it is pushed
	// without a zero sample at its creation, also after a restart.
	pushed int64
	// restored: the series comes from the state directory. Unless its
	// first push is known to be delivered, a receiver may or may not
	// hold it: its zero is sent apart (remotewrite.Series.MayExist).
	restored bool
}

// twin reports whether the series carries bytes and packets.
func (s *series) twin() bool { return s.kind != kindCross }

// routeKey identifies a route by endpoint identity: pointer comparison and
// hashing are what make the per-flow lookup cheap.
type routeKey struct {
	src, dst *resolve.Endpoint
}

// route says where a flow's counts go (series refs; pair and cross may be
// noRef), and caches what the endpoints' labels imply: the placement.
type route struct {
	pair, zone, cross uint32
	Placement
}

// Aggregator holds the counters. It is safe for concurrent use: Apply
// takes its lock once per batch.
type Aggregator struct {
	cfg  Config
	seed maphash.Seed

	mu       sync.Mutex
	routes   map[routeKey]route
	series   []series // by ref
	free     []uint32 // free refs, reused first
	byHash   map[uint64]uint32
	collided map[uint64][]uint32 // same hash, other labels: practically never
	podPairs int                 // live kindPair series
	scratch  []metrics.Label
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

	live    atomic.Int64
	folded  *metrics.Counter
	expired *metrics.Counter
}

// New returns an aggregator registering its self-metrics in reg.
func New(cfg Config, reg *metrics.Registry) (*Aggregator, error) {
	if cfg.MaxPodPairs <= 0 {
		return nil, fmt.Errorf("max pod pairs must be positive, got %d", cfg.MaxPodPairs)
	}
	if cfg.IdleTimeout <= 0 {
		return nil, fmt.Errorf("series idle timeout must be positive, got %s", cfg.IdleTimeout)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	a := &Aggregator{
		cfg:      cfg,
		seed:     maphash.MakeSeed(),
		routes:   map[routeKey]route{},
		byHash:   map[uint64]uint32{},
		collided: map[uint64][]uint32{},
		folded: reg.Counter("kubezonnet_server_pod_pairs_folded_total",
			"Pod pairs folded into an _overflow series because --max-pod-pairs was reached (counted when a pair's route is built, so a pair folds again after its route was evicted)."),
		expired: reg.Counter("kubezonnet_server_series_expired_total",
			"Aggregated series removed after --series-idle-timeout without traffic."),
	}
	reg.GaugeFunc("kubezonnet_server_series", "Live aggregated series (a bytes/packets pair counts once).",
		func() float64 { return float64(a.live.Load()) })
	return a, nil
}

// Len returns the number of live series (a bytes/packets twin counts once).
func (a *Aggregator) Len() int { return int(a.live.Load()) }

// maxRoutes bounds the route cache. Routes of untracked (same-zone) pairs
// have no series behind them, so the cache is bounded on its own and
// simply emptied when full; flows then rebuild their routes.
func (a *Aggregator) maxRoutes() int { return 2*a.cfg.MaxPodPairs + 1<<16 }

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
		r, ok := a.routes[k]
		if !ok {
			if len(a.routes) >= a.maxRoutes() {
				clear(a.routes)
			}
			r = a.newRoute(f, ts)
			a.routes[k] = r
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
	z := &a.series[r.zone]
	z.bytes += c.Bytes
	z.packets += c.Packets
	z.last = ts
	if r.pair != noRef {
		p := &a.series[r.pair]
		p.bytes += c.Bytes
		p.packets += c.Packets
		p.last = ts
	}
	if r.cross != noRef {
		x := &a.series[r.cross]
		x.bytes += c.Bytes
		x.last = ts
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
func (a *Aggregator) newRoute(f *Flow, ts int64) route {
	class := resolve.Classify(f.Src, f.Dst)
	r := route{pair: noRef, cross: noRef, Placement: Placement{Class: class}}
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
		} else if a.podPairs < a.cfg.MaxPodPairs {
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

// findOrCreate returns the ref of the series labelled a.scratch, creating
// it.
func (a *Aggregator) findOrCreate(kind seriesKind, ts int64) uint32 {
	if ref, ok := a.find(); ok {
		return ref
	}
	return a.create(kind, ts)
}

func (a *Aggregator) hash(labels []metrics.Label) uint64 {
	var h maphash.Hash
	h.SetSeed(a.seed)
	for _, l := range labels {
		h.WriteString(l.Name)
		h.WriteByte(0)
		h.WriteString(l.Value)
		h.WriteByte(0)
	}
	return h.Sum64()
}

// find returns the ref of the live series labelled a.scratch.
func (a *Aggregator) find() (uint32, bool) {
	return a.lookup(a.scratch)
}

func (a *Aggregator) lookup(ls []metrics.Label) (uint32, bool) {
	return a.lookupHashed(ls, a.hash(ls))
}

// lookupHashed is lookup for labels whose hash the caller has.
func (a *Aggregator) lookupHashed(ls []metrics.Label, h uint64) (uint32, bool) {
	if ref, ok := a.byHash[h]; ok && equal(a.series[ref].lab, ls) {
		return ref, true
	}
	for _, ref := range a.collided[h] {
		if equal(a.series[ref].lab, ls) {
			return ref, true
		}
	}
	return 0, false
}

// create makes the series labelled a.scratch (its bytes name for twins)
// and indexes it. The label slice allocated here is the only one the
// series will ever have.
func (a *Aggregator) create(kind seriesKind, ts int64) uint32 {
	ref := a.alloc()
	a.install(ref, kind, slices.Clone(a.scratch), ts/int64(time.Millisecond))
	a.series[ref].last = ts
	if a.cfg.Journal != nil {
		a.declared = append(a.declared, ref)
	}
	return ref
}

// alloc returns a free ref.
func (a *Aggregator) alloc() uint32 {
	if n := len(a.free); n > 0 {
		ref := a.free[n-1]
		a.free = a.free[:n-1]
		return ref
	}
	a.series = append(a.series, series{})
	return uint32(len(a.series) - 1)
}

// install makes ref the series of kind labelled lab (which it keeps),
// created at created (unix ms), and indexes it.
func (a *Aggregator) install(ref uint32, kind seriesKind, lab []metrics.Label, created int64) {
	a.installHashed(ref, kind, lab, created, a.hash(lab))
}

// installHashed is install for labels whose hash the caller has.
func (a *Aggregator) installHashed(ref uint32, kind seriesKind, lab []metrics.Label, created int64, h uint64) {
	s := &a.series[ref]
	*s = series{kind: kind, lab: lab, created: created}
	if s.twin() {
		s.pkts = slices.Clone(lab)
		s.pkts[0].Value = packetsName(lab[0].Value)
	}
	if _, taken := a.byHash[h]; taken {
		a.collided[h] = append(a.collided[h], ref)
	} else {
		a.byHash[h] = ref
	}
	if kind == kindPair {
		a.podPairs++
	}
	a.live.Add(1)
}

func packetsName(bytesName string) string {
	switch bytesName {
	case MetricPodPairBytes:
		return MetricPodPairPackets
	case MetricZonePairBytes:
		return MetricZonePairPackets
	}
	panic("aggregate: no packets twin for " + bytesName)
}

func equal(a, b []metrics.Label) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// AppendSeries implements remotewrite.Source: it first expires idle
// series, then appends every live one with its cumulative value and, for
// the series a receiver may not have yet, its creation time (so the
// pusher sends a zero sample first). It is a view: the pusher reads
// through AppendSeriesAt.
func (a *Aggregator) AppendSeries(dst []remotewrite.Series) []remotewrite.Series {
	return a.appendSeries(dst, 0)
}

// AppendSeriesAt implements remotewrite.StampedSource: AppendSeries for
// the push snapshot stamped ts, which also records ts as the first push
// of the series it holds for the first time (and, with a journal, logs
// that), so that Delivered can tell which series every receiver has.
func (a *Aggregator) AppendSeriesAt(dst []remotewrite.Series, ts int64) []remotewrite.Series {
	return a.appendSeries(dst, ts)
}

func (a *Aggregator) appendSeries(dst []remotewrite.Series, ts int64) []remotewrite.Series {
	dst, pos := a.appendSeriesLocked(dst, ts)
	if pos != 0 {
		// The record of first pushes is durable before the push's
		// requests leave. A failed log is the ingest path's to report.
		_ = a.cfg.Journal.Wait(context.Background(), pos)
	}
	return dst
}

// appendSeriesLocked is appendSeries under the lock; pos is the journal
// position of its record of first pushes, 0 for none.
func (a *Aggregator) appendSeriesLocked(dst []remotewrite.Series, ts int64) (_ []remotewrite.Series, pos uint64) {
	now := a.cfg.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.expireLocked(now)
	newly := false
	for i := range a.series {
		s := &a.series[i]
		if s.kind == kindFree {
			continue
		}
		if ts != 0 && s.pushed == 0 {
			s.pushed = ts
			newly = true
		}
		// A restored series first pushed in a push not known to be
		// delivered may be held by a receiver or not: its zero goes
		// apart. One never pushed is new to every receiver.
		created, mayExist := s.created, s.restored && s.pushed != 0
		if s.pushed != 0 && s.pushed <= a.delivered {
			created, mayExist = 0, false
		}
		if s.twin() {
			dst = append(dst,
				remotewrite.Series{Labels: s.lab, Value: float64(s.bytes), Created: created, MayExist: mayExist},
				remotewrite.Series{Labels: s.pkts, Value: float64(s.packets), Created: created, MayExist: mayExist})
			continue
		}
		dst = append(dst, remotewrite.Series{Labels: s.lab, Value: float64(s.bytes), Created: created, MayExist: mayExist})
	}
	if newly && a.cfg.Journal != nil {
		pos = a.cfg.Journal.Append(appendPushed(nil, ts), nil)
	}
	return dst, pos
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
	var dead []uint32
	for i := range a.series {
		s := &a.series[i]
		if s.kind != kindFree && s.last < cutoff {
			dead = append(dead, uint32(i))
		}
	}
	if len(dead) == 0 {
		return
	}
	for _, ref := range dead {
		a.remove(ref)
	}
	a.expired.Add(float64(len(dead)))
	// A route is idle whenever every series it feeds is, so dropping the
	// routes that point at a dead series loses nothing live.
	isFree := func(ref uint32) bool { return ref != noRef && a.series[ref].kind == kindFree }
	for k, r := range a.routes {
		if isFree(r.zone) || isFree(r.pair) || isFree(r.cross) {
			delete(a.routes, k)
		}
	}
	a.free = append(a.free, dead...)
	if a.cfg.Journal != nil {
		a.cfg.Journal.Append(appendExpire(nil, now, dead), nil)
	}
}

// remove unindexes ref and marks its slot free (the caller adds it to
// the free list once no route points at it).
func (a *Aggregator) remove(ref uint32) {
	s := &a.series[ref]
	h := a.hash(s.lab)
	if cur, ok := a.byHash[h]; ok && cur == ref {
		if rest := a.collided[h]; len(rest) > 0 {
			a.byHash[h] = rest[0]
			a.setCollided(h, rest[1:])
		} else {
			delete(a.byHash, h)
		}
	} else {
		list := a.collided[h]
		if i := slices.Index(list, ref); i >= 0 {
			a.setCollided(h, slices.Delete(list, i, i+1))
		}
	}
	if s.kind == kindPair {
		a.podPairs--
	}
	a.live.Add(-1)
	*s = series{}
}

func (a *Aggregator) setCollided(h uint64, list []uint32) {
	if len(list) == 0 {
		delete(a.collided, h)
		return
	}
	a.collided[h] = list
}
