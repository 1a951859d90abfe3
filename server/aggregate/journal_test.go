package aggregate

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

var journalSeed = flag.Uint64("journal.seed", 0, "seed of TestJournalDifferential (0: a new one, logged)")

// memJournal is the aggregator's journal kept in memory: every record is
// durable, in the order appended.
type memJournal struct {
	recs [][]byte
	ids  []*BatchID
}

// Wait: every record of memJournal is durable once appended.
func (j *memJournal) Wait(context.Context, uint64) error { return nil }

func (j *memJournal) Append(rec []byte, id *BatchID) uint64 {
	j.recs = append(j.recs, rec) // the journal owns rec: no copy
	if id != nil {
		c := *id
		id = &c
	}
	j.ids = append(j.ids, id)
	return uint64(len(j.recs))
}

// More endpoints for the differential test: a pod in zone b of the first
// region's workload, and one in zone c of another region.
var (
	webB   = &resolve.Endpoint{Kind: resolve.KindPod, Namespace: "shop", Pod: "web-3", Workload: "web", WorkloadKind: "Deployment", Node: "n-b", Zone: "b", Region: "r1"}
	cacheC = &resolve.Endpoint{Kind: resolve.KindPod, Namespace: "infra", Pod: "cache-0", Workload: "cache", WorkloadKind: "StatefulSet", Node: "n-c", Zone: "c", Region: "r2"}
)

var diffEndpoints = []*resolve.Endpoint{webA, webA2, webB, dbB, dbBCopy, dbA, cacheC, nodeB, unknownEP, inet}

// Services the differential test's flows may be addressed to (nil: none).
var diffServices = []*resolve.Service{nil, nil, nil,
	{Namespace: "shop", Name: "db", TrafficDistribution: "PreferSameZone"},
	{Namespace: "infra", Name: "cache"},
}

// model is the differential test's view of what the aggregator must hold,
// written from the series contract and Config's documentation rather than
// from the implementation: series by their rendered labels, and the route
// cache only as far as the folding rule depends on it (a pair folds when
// its route is built with --max-pod-pairs reached, and stays where its
// route sends it until the route goes: when a series it feeds expires, or
// at a restart).
type model struct {
	allPairs  bool
	max       int
	maxSvc    int
	idle      time.Duration
	series    map[string]*mSeries // by the bytes series' rendered labels
	routes    map[[2]*resolve.Endpoint]mRoute
	svcRoutes map[mRouteKey]string
	delivered int64
}

// mRouteKey is what a Service route is built for: the endpoints, the
// Service and whether the flow was avoidable.
type mRouteKey struct {
	s, d      *resolve.Endpoint
	svc       *resolve.Service
	avoidable bool
}

type mSeries struct {
	pkts           string // the packets twin's rendered labels, "" for none
	bytes, packets uint64
	created        int64 // unix ms
	last           int64 // unix ns
	pair           bool  // counts against max pod pairs
	svc            bool  // counts against max service series
	// pushed: the stamp of the first push that held the series (0:
	// none). Once a push at least as new is delivered, the series is
	// pushed without a creation time.
	pushed int64
}

// mRoute holds the series a route feeds ("" for none).
type mRoute struct{ zone, pair, cross string }

func newModel(allPairs bool, max, maxSvc int, idle time.Duration) *model {
	return &model{allPairs: allPairs, max: max, maxSvc: maxSvc, idle: idle,
		series: map[string]*mSeries{}, routes: map[[2]*resolve.Endpoint]mRoute{}, svcRoutes: map[mRouteKey]string{}}
}

func (m *model) clone() *model {
	c := *m
	c.series = map[string]*mSeries{}
	for k, s := range m.series {
		cs := *s
		c.series[k] = &cs
	}
	c.routes = maps.Clone(m.routes)
	c.svcRoutes = maps.Clone(m.svcRoutes)
	return &c
}

// labelString renders a series: name{label="value",...}, labels sorted by
// name, empty values left out.
func labelString(name string, ls map[string]string) string {
	var b strings.Builder
	b.WriteString(name)
	b.WriteByte('{')
	first := true
	for _, k := range slices.Sorted(maps.Keys(ls)) {
		if ls[k] == "" {
			continue
		}
		if !first {
			b.WriteByte(',')
		}
		first = false
		fmt.Fprintf(&b, "%s=%q", k, ls[k])
	}
	b.WriteByte('}')
	return b.String()
}

func modelClass(s, d *resolve.Endpoint) string {
	switch {
	case s.Kind == resolve.KindExternal || d.Kind == resolve.KindExternal:
		return "external"
	case s.Kind == resolve.KindUnknown || d.Kind == resolve.KindUnknown:
		return "unknown"
	case s.Zone == d.Zone:
		return "same-zone"
	case s.Region != d.Region:
		return "cross-region"
	}
	return "cross-zone"
}

func pairSeries(metric string, s, d *resolve.Endpoint, class string, fold bool) string {
	sp, dp := s.Pod, d.Pod
	if fold {
		sp, dp = "_overflow", "_overflow"
	}
	return labelString(metric, map[string]string{
		"class":    class,
		"src_kind": s.Kind.String(), "src_namespace": s.Namespace, "src_pod": sp,
		"src_workload": s.Workload, "src_workload_kind": s.WorkloadKind, "src_zone": s.Zone,
		"dst_kind": d.Kind.String(), "dst_namespace": d.Namespace, "dst_pod": dp,
		"dst_workload": d.Workload, "dst_workload_kind": d.WorkloadKind, "dst_zone": d.Zone,
	})
}

func (m *model) ensure(key, pkts string, now time.Time, pair bool) string {
	if _, ok := m.series[key]; !ok {
		m.series[key] = &mSeries{pkts: pkts, created: now.UnixMilli(), last: now.UnixNano(), pair: pair}
	}
	return key
}

func (m *model) livePairs() int {
	n := 0
	for _, s := range m.series {
		if s.pair {
			n++
		}
	}
	return n
}

func (m *model) liveSvc() int {
	n := 0
	for _, s := range m.series {
		if s.svc {
			n++
		}
	}
	return n
}

func serviceSeries(metric string, s, d *resolve.Endpoint, svc *resolve.Service, avoidable, fold bool) string {
	w, wk := s.Workload, s.WorkloadKind
	if fold {
		w, wk = "_overflow", ""
	}
	return labelString(metric, map[string]string{
		"service_namespace": svc.Namespace, "service": svc.Name, "traffic_distribution": svc.TrafficDistribution,
		"src_namespace": s.Namespace, "src_workload": w, "src_workload_kind": wk,
		"src_zone": s.Zone, "dst_zone": d.Zone, "avoidable": strconv.FormatBool(avoidable),
	})
}

// flow adds one flow at now and returns its class.
func (m *model) flow(s, d *resolve.Endpoint, svc *resolve.Service, avoidable bool, c flow.Counts, now time.Time) string {
	class := modelClass(s, d)
	k := [2]*resolve.Endpoint{s, d}
	r, ok := m.routes[k]
	if !ok {
		zs := map[string]string{"src_zone": s.Zone, "dst_zone": d.Zone}
		r.zone = m.ensure(labelString("kubezonnet_zone_pair_bytes_total", zs),
			labelString("kubezonnet_zone_pair_packets_total", zs), now, false)
		if m.allPairs || class != "same-zone" {
			key := pairSeries("kubezonnet_pod_pair_bytes_total", s, d, class, false)
			pkts := pairSeries("kubezonnet_pod_pair_packets_total", s, d, class, false)
			hasPod := s.Kind == resolve.KindPod || d.Kind == resolve.KindPod
			switch {
			case m.series[key] != nil || !hasPod:
				r.pair = m.ensure(key, pkts, now, false)
			case m.livePairs() < m.max:
				r.pair = m.ensure(key, pkts, now, true)
			default:
				r.pair = m.ensure(pairSeries("kubezonnet_pod_pair_bytes_total", s, d, class, true),
					pairSeries("kubezonnet_pod_pair_packets_total", s, d, class, true), now, false)
			}
		}
		if (class == "cross-zone" || class == "cross-region") && s.Kind == resolve.KindPod {
			r.cross = m.ensure(labelString("pod_cross_zone_network_traffic_bytes_total",
				map[string]string{"namespace": s.Namespace, "pod": s.Pod}), "", now, false)
		}
		m.routes[k] = r
	}
	var svcKey string
	if svc != nil && s.Kind == resolve.KindPod {
		sk := mRouteKey{s, d, svc, avoidable}
		var ok bool
		if svcKey, ok = m.svcRoutes[sk]; !ok {
			av := avoidable && (class == "cross-zone" || class == "cross-region")
			key := serviceSeries("kubezonnet_service_bytes_total", s, d, svc, av, false)
			pkts := serviceSeries("kubezonnet_service_packets_total", s, d, svc, av, false)
			switch {
			case m.series[key] != nil:
				svcKey = key
			case m.liveSvc() < m.maxSvc:
				svcKey = m.ensure(key, pkts, now, false)
				m.series[key].svc = true
			default:
				svcKey = m.ensure(serviceSeries("kubezonnet_service_bytes_total", s, d, svc, av, true),
					serviceSeries("kubezonnet_service_packets_total", s, d, svc, av, true), now, false)
			}
			m.svcRoutes[sk] = svcKey
		}
	}
	for _, key := range []string{r.zone, r.pair, r.cross, svcKey} {
		if key == "" {
			continue
		}
		se := m.series[key]
		se.bytes += c.Bytes
		if se.pkts != "" {
			se.packets += c.Packets
		}
		se.last = now.UnixNano()
	}
	return class
}

func (m *model) expire(now time.Time) {
	cutoff := now.Add(-m.idle).UnixNano()
	for k, s := range m.series {
		if s.last < cutoff {
			delete(m.series, k)
		}
	}
	for k, r := range m.routes {
		for _, key := range []string{r.zone, r.pair, r.cross} {
			if key != "" && m.series[key] == nil {
				delete(m.routes, k)
				break
			}
		}
	}
	for k, key := range m.svcRoutes {
		if m.series[key] == nil {
			delete(m.svcRoutes, k)
		}
	}
}

func (m *model) deliver(ts int64) { m.delivered = max(m.delivered, ts) }

// push is a push snapshot stamped ts: after expiring at now, it is the
// first push of every series that had none.
func (m *model) push(now time.Time, ts int64) {
	m.expire(now)
	for _, s := range m.series {
		if s.pushed == 0 {
			s.pushed = ts
		}
	}
}

// restart is what a restart changes: the route cache is gone.
func (m *model) restart() {
	clear(m.routes)
	clear(m.svcRoutes)
}

// lines renders the model's series after expiring at now, as seriesLines
// does an aggregator's.
func (m *model) lines(now time.Time, created bool) []string {
	m.expire(now)
	var out []string
	for k, s := range m.series {
		c := s.created
		if s.pushed != 0 && s.pushed <= m.delivered {
			c = 0
		}
		out = append(out, line(k, s.bytes, c, created))
		if s.pkts != "" {
			out = append(out, line(s.pkts, s.packets, c, created))
		}
	}
	slices.Sort(out)
	return out
}

func line(labels string, v uint64, created int64, withCreated bool) string {
	l := labels + " " + strconv.FormatUint(v, 10)
	if withCreated {
		l += " created=" + strconv.FormatInt(created, 10)
	}
	return l
}

// seriesLines renders what AppendSeries returned, sorted, checking what the
// remote-write contract requires of labels: __name__ first, the others
// sorted by name and none empty.
func seriesLines(t testing.TB, ss []remotewrite.Series, created bool) []string {
	t.Helper()
	out := make([]string, 0, len(ss))
	for _, s := range ss {
		if len(s.Labels) == 0 || s.Labels[0].Name != "__name__" {
			t.Fatalf("series without __name__ first: %v", s.Labels)
		}
		ls := map[string]string{}
		for i, l := range s.Labels[1:] {
			if l.Value == "" || (i > 0 && l.Name <= s.Labels[i].Name) {
				t.Fatalf("labels empty or not sorted: %v", s.Labels)
			}
			ls[l.Name] = l.Value
		}
		out = append(out, line(labelString(s.Labels[0].Value, ls), uint64(s.Value), s.Created, created))
	}
	slices.Sort(out)
	return out
}

func diffLines(t testing.TB, what string, got, want []string) {
	t.Helper()
	if slices.Equal(got, want) {
		return
	}
	var b strings.Builder
	for _, l := range got {
		if !slices.Contains(want, l) {
			fmt.Fprintf(&b, "\n  got only:  %s", l)
		}
	}
	for _, l := range want {
		if !slices.Contains(got, l) {
			fmt.Fprintf(&b, "\n  want only: %s", l)
		}
	}
	t.Fatalf("%s: %d series, want %d:%s", what, len(got), len(want), b.String())
}

// checkpoint is a checkpoint body and the journal position it holds.
type checkpoint struct {
	body []byte
	pos  int
}

// TestJournalDifferential runs random traffic through two aggregators fed
// alike: one never restarted, and one with a journal that is restarted
// from time to time, from a checkpoint (the newest, an older one, or none)
// and the journal records after it, as the server does at start. After
// every restart the restored aggregator must hold exactly the state of
// the one that "crashed", and each aggregator must agree with a model
// computed from the flows alone.
func TestJournalDifferential(t *testing.T) {
	for _, tc := range []struct {
		name     string
		allPairs bool
		max      int
	}{
		{name: "billable pairs", max: 3},
		{name: "all pairs", allPairs: true, max: 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			seed := *journalSeed
			if seed == 0 {
				seed = uint64(time.Now().UnixNano())
			}
			t.Logf("seed %d (rerun with -journal.seed=%d)", seed, seed)
			runDifferential(t, rand.New(rand.NewPCG(seed, 0)), tc.allPairs, tc.max, 3000)
		})
	}
}

// maxSvcSeries is the differential test's --max-service-series: small,
// so that Service series fold too.
const maxSvcSeries = 4

func runDifferential(t *testing.T, rng *rand.Rand, allPairs bool, maxPairs, steps int) {
	const idle = time.Minute
	clock := time.Unix(1_700_000_000, 0)
	now := func() time.Time { return clock }
	j := &memJournal{}
	newAgg := func(journal Journal) *Aggregator {
		a, err := New(Config{AllPairs: allPairs, MaxPodPairs: maxPairs, MaxServiceSeries: maxSvcSeries, IdleTimeout: idle, Now: now, Journal: journal}, metrics.New())
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	ref := newAgg(nil) // never restarted, no journal
	live := newAgg(j)
	refModel := newModel(allPairs, maxPairs, maxSvcSeries, idle)
	liveModel := refModel.clone()
	var cps []checkpoint
	var seq uint64
	var pushes []int64 // stamps of the push snapshots taken
	var lastPush int64
	var stats struct {
		batches, restarts, fromNone, fromOlder, compared, crossCompared, reused int
	}

	compare := func(when string) {
		t.Helper()
		stats.compared++
		refLines := seriesLines(t, ref.AppendSeries(nil), true)
		liveLines := seriesLines(t, live.AppendSeries(nil), true)
		diffLines(t, when+": never restarted vs model", refLines, refModel.lines(clock, true))
		diffLines(t, when+": restarted vs model", liveLines, liveModel.lines(clock, true))
		// Both aggregators hold the same counters unless a restart
		// cleared a route that still folded a pair in the other.
		if slices.Equal(refModel.lines(clock, false), liveModel.lines(clock, false)) {
			stats.crossCompared++
			diffLines(t, when+": restarted vs never restarted",
				seriesLines(t, live.AppendSeries(nil), false), seriesLines(t, ref.AppendSeries(nil), false))
		}
	}

	for step := range steps {
		// One step in five keeps the clock, so that series are created at
		// the very millisecond of a delivered push.
		if rng.IntN(5) > 0 {
			clock = clock.Add(time.Duration(rng.IntN(20_000)) * time.Millisecond)
		}
		switch op := rng.IntN(100); {
		case op < 50: // a batch
			n := 1 + rng.IntN(8)
			flows := make([]Flow, n)
			classes := make([]string, n)
			for i := range flows {
				s, d := diffEndpoints[rng.IntN(len(diffEndpoints))], diffEndpoints[rng.IntN(len(diffEndpoints))]
				c := flow.Counts{Bytes: 1 + uint64(rng.IntN(10_000)), Packets: 1 + uint64(rng.IntN(10))}
				svc, avoidable := diffServices[rng.IntN(len(diffServices))], rng.IntN(2) == 0
				flows[i] = Flow{Src: s, Dst: d, Service: svc, Avoidable: avoidable, Counts: c}
				classes[i] = refModel.flow(s, d, svc, avoidable, c, clock)
				if lc := liveModel.flow(s, d, svc, avoidable, c, clock); lc != classes[i] {
					t.Fatalf("models disagree on the class of a flow: %s, %s", lc, classes[i])
				}
			}
			var id *BatchID
			if rng.IntN(2) == 0 {
				seq++
				id = &BatchID{Node: "node-" + strconv.Itoa(rng.IntN(3)), Incarnation: "inc", Seq: seq}
			}
			ref.Apply(clock, slices.Clone(flows), nil)
			slots, held := live.store.Slots(), live.store.Len()
			placed := make([]Placement, n)
			if pos := live.ApplyPlaced(clock, flows, id, placed); pos != uint64(len(j.recs)) {
				t.Fatalf("step %d: Apply returned journal position %d, the journal has %d records", step, pos, len(j.recs))
			}
			if live.store.Len()-held > live.store.Slots()-slots && stats.restarts > 0 {
				stats.reused++
			}
			for i, f := range flows {
				if placed[i].Class.String() != classes[i] {
					t.Fatalf("step %d: flow %s -> %s placed in %v, the model says %q", step, f.Src.Pod+f.Src.Workload, f.Dst.Pod+f.Dst.Workload, placed[i].Class, classes[i])
				}
			}
			stats.batches++
		case op < 54: // a push snapshot
			lastPush = max(clock.UnixMilli(), lastPush+1)
			pushes = append(pushes, lastPush)
			ref.capture(lastPush)
			live.capture(lastPush)
			refModel.push(clock, lastPush)
			liveModel.push(clock, lastPush)
		case op < 58: // a push delivered, the newest or an older one
			if len(pushes) == 0 {
				break
			}
			ts := pushes[len(pushes)-1]
			if rng.IntN(2) == 0 {
				ts = pushes[rng.IntN(len(pushes))]
			}
			ref.Delivered(ts)
			live.Delivered(ts)
			refModel.deliver(ts)
			liveModel.deliver(ts)
		case op < 66:
			ref.Expire(clock)
			live.Expire(clock)
			refModel.expire(clock)
			liveModel.expire(clock)
		case op < 76:
			compare(fmt.Sprintf("step %d", step))
		case op < 88: // a checkpoint
			var cp checkpoint
			snap := live.Snapshot(func() { cp.pos = len(j.recs) })
			var buf bytes.Buffer
			n, err := snap.WriteTo(&buf)
			if err != nil || n != int64(buf.Len()) {
				t.Fatalf("step %d: checkpoint: %d bytes written, %d in the buffer, err %v", step, n, buf.Len(), err)
			}
			cp.body = buf.Bytes()
			cps = append(cps, cp)
		default: // a crash and restart
			var before bytes.Buffer
			if _, err := live.Snapshot(nil).WriteTo(&before); err != nil {
				t.Fatal(err)
			}
			from := checkpoint{}
			switch k := rng.IntN(10); {
			case len(cps) == 0 || k == 0:
				stats.fromNone++
			case k == 1:
				stats.fromOlder++
				from = cps[rng.IntN(len(cps))]
			default:
				from = cps[len(cps)-1]
			}
			nrecs := len(j.recs)
			restored := newAgg(j)
			if from.body != nil {
				if err := restored.Restore(from.body); err != nil {
					t.Fatalf("step %d: restoring the checkpoint at record %d: %v", step, from.pos, err)
				}
			}
			for i := from.pos; i < nrecs; i++ {
				id, err := restored.Replay(j.recs[i])
				if err != nil {
					t.Fatalf("step %d: replaying journal record %d of %d (checkpoint at %d): %v", step, i, nrecs, from.pos, err)
				}
				if want := j.ids[i]; (id == nil) != (want == nil) || (id != nil && *id != *want) {
					t.Fatalf("step %d: record %d replayed as batch %v, want %v", step, i, id, want)
				}
			}
			restored.FinishReplay()
			if len(j.recs) != nrecs {
				t.Fatalf("step %d: restoring appended %d journal records", step, len(j.recs)-nrecs)
			}
			// The restored aggregator holds the crashed one's state
			// exactly: series by series and ref by ref.
			var after bytes.Buffer
			if _, err := restored.Snapshot(nil).WriteTo(&after); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(before.Bytes(), after.Bytes()) {
				diffLines(t, fmt.Sprintf("step %d: restored vs crashed", step),
					seriesLines(t, restored.AppendSeries(nil), false), seriesLines(t, live.AppendSeries(nil), false))
				t.Fatalf("step %d: restored state differs from the crashed one's (same series, other refs or times)", step)
			}
			if restored.Len() != live.Len() {
				t.Fatalf("step %d: restored Len %d, crashed %d", step, restored.Len(), live.Len())
			}
			live = restored
			liveModel.restart()
			stats.restarts++
			compare(fmt.Sprintf("step %d, after restart %d", step, stats.restarts))
		}
	}
	compare("end")
	t.Logf("%d steps: %d batches, %d journal records, %d checkpoints, %d restarts (%d from no checkpoint, %d from an older one), %d comparisons (%d of both aggregators), %d batches reusing a freed ref after a restart",
		steps, stats.batches, len(j.recs), len(cps), stats.restarts, stats.fromNone, stats.fromOlder, stats.compared, stats.crossCompared, stats.reused)
	if stats.restarts == 0 || stats.reused == 0 {
		t.Errorf("the run did not exercise restarts (%d) and ref reuse after one (%d): lengthen it", stats.restarts, stats.reused)
	}
}

// A series whose batch was received before a push was stamped, but
// applied after the push read the series, was not in that push: once the
// push is delivered, the series still gets its zero sample, also after a
// restart (its creation time is no later than the delivered stamp, so a
// rule on creation times would call it known).
func TestFirstPushDecidesKnown(t *testing.T) {
	t0 := time.UnixMilli(1_700_000_000_000)
	j := &memJournal{}
	newAgg := func() *Aggregator {
		a, err := New(Config{MaxPodPairs: 10, IdleTimeout: time.Hour, Now: func() time.Time { return t0 }, Journal: j}, metrics.New())
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	a := newAgg()
	a.Apply(t0, []Flow{cf(webA, dbB, 100, 1)}, nil)
	stamp := t0.UnixMilli() + 5
	a.capture(stamp)
	// Received at t0 (before the stamp), applied after the push read.
	a.Apply(t0, []Flow{cf(cacheC, webA, 7, 1)}, nil)
	a.Delivered(stamp)
	// A second push holds cacheC's pair first and is not delivered; a
	// pair made after it is never pushed.
	a.capture(stamp + 1)
	a.Apply(t0, []Flow{cf(dbB, webA2, 3, 1)}, nil)

	created := func(a *Aggregator) map[string]int64 {
		out := map[string]int64{}
		for _, s := range a.AppendSeries(nil) {
			if s.Labels[0].Value == MetricPodPairBytes {
				for _, l := range s.Labels {
					if l.Name == "src_pod" {
						out[l.Value] = s.Created
					}
				}
			}
		}
		return out
	}
	want := map[string]int64{"web-1": 0, cacheC.Pod: t0.UnixMilli(), "db-0": t0.UnixMilli()}
	if got := created(a); !maps.Equal(got, want) {
		t.Errorf("before a restart: creation times %v, want %v", got, want)
	}
	restored := newAgg()
	for _, rec := range slices.Clone(j.recs) {
		if _, err := restored.Replay(rec); err != nil {
			t.Fatal(err)
		}
	}
	restored.FinishReplay()
	if got := created(restored); !maps.Equal(got, want) {
		t.Errorf("after a restart: creation times %v, want %v", got, want)
	}
	// A restored series first pushed in a push not known to be delivered
	// may be held by a receiver already (the crash may have come after
	// the push arrived): it says so, and its zero travels apart. One
	// never pushed, and a series made after the restart, do not.
	restored.Apply(t0, []Flow{cf(webA2, dbB, 1, 1)}, nil)
	for _, s := range restored.AppendSeries(nil) {
		if s.Labels[0].Value != MetricPodPairBytes {
			continue
		}
		pod := ""
		for _, l := range s.Labels {
			if l.Name == "src_pod" {
				pod = l.Value
			}
		}
		if want := pod == cacheC.Pod; s.MayExist != want {
			t.Errorf("pair from %s: MayExist %v, want %v", pod, s.MayExist, want)
		}
	}
}
