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
package aggregate

import (
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
	MetricPodPairBytes   = "kubezonnet_pod_pair_bytes_total"
	MetricPodPairPackets = "kubezonnet_pod_pair_packets_total"
	MetricZonePairBytes  = "kubezonnet_zone_pair_bytes_total"
	MetricZonePairPkts   = "kubezonnet_zone_pair_packets_total"
	MetricPodCrossZone   = "pod_cross_zone_network_traffic_bytes_total"
	// Overflow is the pod label value of series that fold pod pairs beyond
	// --max-pod-pairs into their workload pair.
	Overflow = "_overflow"
)

// Classes of a pair, as resolve.Classify names them.
const (
	ClassSameZone    = resolve.ClassSameZone
	ClassCrossZone   = resolve.ClassCrossZone
	ClassCrossRegion = resolve.ClassCrossRegion
	ClassExternal    = resolve.ClassExternal
	ClassUnknown     = resolve.ClassUnknown
)

// Bits of Flow.Unknown.
const (
	SrcUnknown uint8 = 1 << iota
	DstUnknown
)

// Config bounds and shapes the aggregation.
type Config struct {
	// AllPairs keeps pod-pair series for every class, not only the
	// billable ones (cross-zone, cross-region, external).
	AllPairs bool
	// MaxPodPairs bounds the live pod-pair series; beyond it, new pairs
	// fold into their workload pair's _overflow series.
	MaxPodPairs int
	// IdleTimeout expires series that received nothing for that long.
	IdleTimeout time.Duration
	// Now is the clock; nil means time.Now (tests inject theirs).
	Now func() time.Time
}

// Flow is one resolved flow, the unit Apply consumes.
type Flow struct {
	Src, Dst *resolve.Endpoint
	flow.Counts
	// Class is set by Apply to resolve.Classify(Src, Dst), and Unknown to
	// which sides are of kind unknown. Both are cached per endpoint pair,
	// so the hot path touches neither endpoint once the pair is known.
	Class   string
	Unknown uint8
	// Index is the caller's: Apply leaves it alone (ingest keeps the
	// flow's position in its batch there).
	Index int32
}

type seriesKind uint8

const (
	kindPair seriesKind = iota // pod pair, counted against MaxPodPairs
	kindOverflow
	kindHostPair // pair without a pod side: already workload-grained
	kindZone
	kindCross
)

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
	kind    seriesKind
	dead    bool
}

// twin reports whether the series carries bytes and packets.
func (s *series) twin() bool { return s.kind != kindCross }

// labels returns the bytes (or only) label set.
func (s *series) labels() []metrics.Label { return s.lab }

// routeKey identifies a route by endpoint identity: pointer comparison and
// hashing are what make the per-flow lookup cheap.
type routeKey struct {
	src, dst *resolve.Endpoint
}

// route says where a flow's counts go (pair and cross may be nil), and
// caches what the endpoints' labels imply: the class and unknown sides.
type route struct {
	pair, zone, cross *series
	class             uint8 // index into classes: keeps the route 32 bytes
	unknown           uint8
}

// classes are the values of Flow.Class, indexed by route.class.
var classes = [...]string{ClassSameZone, ClassCrossZone, ClassCrossRegion, ClassExternal, ClassUnknown}

func classIndex(c string) uint8 {
	for i, v := range classes {
		if v == c {
			return uint8(i)
		}
	}
	return uint8(len(classes) - 1) // unknown
}

// Aggregator holds the counters. It is safe for concurrent use: Apply
// takes its lock once per batch.
type Aggregator struct {
	cfg  Config
	seed maphash.Seed

	mu       sync.Mutex
	routes   map[routeKey]route
	byHash   map[uint64]*series
	collided map[uint64][]*series // same hash, other labels: practically never
	podPairs int                  // live kindPair series
	scratch  []metrics.Label

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
		byHash:   map[uint64]*series{},
		collided: map[uint64][]*series{},
		folded: reg.Counter("kubezonnet_server_pod_pairs_folded_total",
			"Pod pairs folded into an _overflow series because --max-pod-pairs was reached (counted when a pair's route is built, so a pair folds again after its route was evicted)."),
		expired: reg.Counter("kubezonnet_server_series_expired_total",
			"Aggregated series removed after --series-idle-timeout without traffic."),
	}
	reg.GaugeFunc("kubezonnet_server_series", "Live aggregated series (a bytes/packets pair counts once).",
		func() float64 { return float64(a.live.Load()) })
	return a, nil
}

// maxRoutes bounds the route cache. Routes of untracked (same-zone) pairs
// have no series behind them, so the cache is bounded on its own and
// simply emptied when full; flows then rebuild their routes.
func (a *Aggregator) maxRoutes() int { return 2*a.cfg.MaxPodPairs + 1<<16 }

// Apply adds flows observed at now (the server's receive time, which is
// what idleness is measured against).
func (a *Aggregator) Apply(now time.Time, flows []Flow) {
	ts := now.UnixNano()
	a.mu.Lock()
	defer a.mu.Unlock()
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
		f.Class, f.Unknown = classes[r.class], r.unknown
		r.zone.add(f.Counts, ts)
		if r.pair != nil {
			r.pair.add(f.Counts, ts)
		}
		if r.cross != nil {
			r.cross.bytes += f.Bytes
			r.cross.last = ts
		}
	}
}

func (s *series) add(c flow.Counts, ts int64) {
	s.bytes += c.Bytes
	s.packets += c.Packets
	s.last = ts
}

// tracked reports whether a class gets pod-pair series.
func (a *Aggregator) tracked(class string) bool {
	if a.cfg.AllPairs {
		return true
	}
	return class == ClassCrossZone || class == ClassCrossRegion || class == ClassExternal
}

// crossesZone reports whether a class counts in the compatibility series.
func crossesZone(class string) bool {
	return class == ClassCrossZone || class == ClassCrossRegion
}

// newRoute finds or creates the series a new endpoint pair feeds.
func (a *Aggregator) newRoute(f *Flow, ts int64) route {
	f.Class = classes[classIndex(resolve.Classify(f.Src, f.Dst))]
	r := route{class: classIndex(f.Class)}
	if f.Src.Kind == resolve.KindUnknown {
		r.unknown |= SrcUnknown
	}
	if f.Dst.Kind == resolve.KindUnknown {
		r.unknown |= DstUnknown
	}
	a.scratch = zoneLabels(a.scratch[:0], MetricZonePairBytes, f.Src.Zone, f.Dst.Zone)
	r.zone = a.findOrCreate(kindZone, ts)
	if a.tracked(f.Class) {
		a.scratch = pairLabels(a.scratch[:0], MetricPodPairBytes, f, false)
		hasPod := f.Src.Kind == resolve.KindPod || f.Dst.Kind == resolve.KindPod
		if s := a.find(); s != nil {
			r.pair = s
		} else if !hasPod {
			// Nodes, static endpoints and the internet are few: such
			// pairs need no folding and do not use up pod-pair slots.
			r.pair = a.create(kindHostPair, ts)
		} else if a.podPairs < a.cfg.MaxPodPairs {
			r.pair = a.create(kindPair, ts)
		} else {
			a.folded.Inc()
			a.scratch = pairLabels(a.scratch[:0], MetricPodPairBytes, f, true)
			r.pair = a.findOrCreate(kindOverflow, ts)
		}
	}
	if crossesZone(f.Class) && f.Src.Kind == resolve.KindPod {
		a.scratch = append(a.scratch[:0],
			metrics.Label{Name: "__name__", Value: MetricPodCrossZone},
			metrics.Label{Name: "namespace", Value: f.Src.Namespace},
			metrics.Label{Name: "pod", Value: f.Src.Pod})
		a.scratch = dropEmpty(a.scratch)
		r.cross = a.findOrCreate(kindCross, ts)
	}
	return r
}

// findOrCreate looks up the series labelled a.scratch, creating it.
func (a *Aggregator) findOrCreate(kind seriesKind, ts int64) *series {
	if s := a.find(); s != nil {
		return s
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

// find returns the live series labelled a.scratch, or nil.
func (a *Aggregator) find() *series {
	h := a.hash(a.scratch)
	if s := a.byHash[h]; s != nil && equal(s.labels(), a.scratch) {
		return s
	}
	for _, s := range a.collided[h] {
		if equal(s.labels(), a.scratch) {
			return s
		}
	}
	return nil
}

// create makes the series labelled a.scratch (its bytes name for twins)
// and indexes it. The label slice allocated here is the only one the
// series will ever have.
func (a *Aggregator) create(kind seriesKind, ts int64) *series {
	s := &series{kind: kind, last: ts, lab: slices.Clone(a.scratch)}
	if s.twin() {
		s.pkts = slices.Clone(a.scratch)
		s.pkts[0].Value = packetsName(a.scratch[0].Value)
	}
	h := a.hash(a.scratch)
	if _, taken := a.byHash[h]; taken {
		a.collided[h] = append(a.collided[h], s)
	} else {
		a.byHash[h] = s
	}
	if kind == kindPair {
		a.podPairs++
	}
	a.live.Add(1)
	return s
}

func packetsName(bytesName string) string {
	switch bytesName {
	case MetricPodPairBytes:
		return MetricPodPairPackets
	case MetricZonePairBytes:
		return MetricZonePairPkts
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
// series, then appends every live one with its cumulative value.
func (a *Aggregator) AppendSeries(dst []remotewrite.Series) []remotewrite.Series {
	now := a.cfg.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.expireLocked(now)
	each := func(s *series) {
		if s.twin() {
			dst = append(dst,
				remotewrite.Series{Labels: s.lab, Value: float64(s.bytes)},
				remotewrite.Series{Labels: s.pkts, Value: float64(s.packets)})
			return
		}
		dst = append(dst, remotewrite.Series{Labels: s.lab, Value: float64(s.bytes)})
	}
	for _, s := range a.byHash {
		each(s)
	}
	for _, list := range a.collided {
		for _, s := range list {
			each(s)
		}
	}
	return dst
}

// Expire removes series idle for longer than the idle timeout at now.
func (a *Aggregator) Expire(now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.expireLocked(now)
}

func (a *Aggregator) expireLocked(now time.Time) {
	cutoff := now.Add(-a.cfg.IdleTimeout).UnixNano()
	n := 0
	for h, s := range a.byHash {
		if s.last >= cutoff {
			continue
		}
		a.drop(s)
		n++
		if rest := a.collided[h]; len(rest) > 0 {
			a.byHash[h] = rest[0]
			a.setCollided(h, rest[1:])
		} else {
			delete(a.byHash, h)
		}
	}
	for h, list := range a.collided {
		kept := list[:0]
		for _, s := range list {
			if s.last >= cutoff {
				kept = append(kept, s)
				continue
			}
			a.drop(s)
			n++
		}
		a.setCollided(h, kept)
	}
	if n == 0 {
		return
	}
	a.expired.Add(float64(n))
	// A route is idle whenever every series it feeds is, so dropping the
	// routes that point at a dead series loses nothing live.
	for k, r := range a.routes {
		if r.zone.dead || (r.pair != nil && r.pair.dead) || (r.cross != nil && r.cross.dead) {
			delete(a.routes, k)
		}
	}
}

func (a *Aggregator) setCollided(h uint64, list []*series) {
	if len(list) == 0 {
		delete(a.collided, h)
		return
	}
	a.collided[h] = list
}

func (a *Aggregator) drop(s *series) {
	s.dead = true
	if s.kind == kindPair {
		a.podPairs--
	}
	a.live.Add(-1)
}
