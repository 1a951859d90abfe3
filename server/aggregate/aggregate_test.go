package aggregate

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// Endpoints as the resolver would return them, written out by hand so that
// the expected label values below are checked against the contract.
var (
	webA      = &resolve.Endpoint{Kind: resolve.KindPod, Namespace: "shop", Pod: "web-1", Workload: "web", WorkloadKind: "Deployment", Node: "n-a", Zone: "a", Region: "r1"}
	webA2     = &resolve.Endpoint{Kind: resolve.KindPod, Namespace: "shop", Pod: "web-2", Workload: "web", WorkloadKind: "Deployment", Node: "n-a", Zone: "a", Region: "r1"}
	dbB       = &resolve.Endpoint{Kind: resolve.KindPod, Namespace: "shop", Pod: "db-0", Workload: "db", WorkloadKind: "StatefulSet", Node: "n-b", Zone: "b", Region: "r1"}
	dbA       = &resolve.Endpoint{Kind: resolve.KindPod, Namespace: "shop", Pod: "db-1", Workload: "db", WorkloadKind: "StatefulSet", Node: "n-a", Zone: "a", Region: "r1"}
	nodeB     = &resolve.Endpoint{Kind: resolve.KindNode, Workload: "n-b", WorkloadKind: "Node", Node: "n-b", Zone: "b", Region: "r1"}
	unknownEP = &resolve.Endpoint{Kind: resolve.KindUnknown, Workload: "unknown", WorkloadKind: "Unknown", Zone: "unknown", Region: "unknown"}
	inet      = &resolve.Endpoint{Kind: resolve.KindExternal, Workload: "external", WorkloadKind: "External", Zone: "external", Region: "external"}
	// dbBCopy has dbB's labels in another allocation, as after a resolver
	// rebuild of the endpoint.
	dbBCopy = func() *resolve.Endpoint { c := *dbB; return &c }()
)

// fl builds a flow whose pair resolve.Classify must class as class (a
// test table's own check of its data); apply checks that Apply places it
// so.
func fl(src, dst *resolve.Endpoint, class resolve.Class, bytes, packets uint64) Flow {
	if got := resolve.Classify(src, dst); got != class {
		panic(fmt.Sprintf("test flow %s -> %s is %v, not %v", src.Pod+src.Workload, dst.Pod+dst.Workload, got, class))
	}
	return cf(src, dst, bytes, packets)
}

// cf builds a flow, whatever its class.
func cf(src, dst *resolve.Endpoint, bytes, packets uint64) Flow {
	return Flow{Src: src, Dst: dst, Counts: flow.Counts{Bytes: bytes, Packets: packets}}
}

// apply feeds flows one by one, checking that Apply places each in the
// class resolve.Classify gives, with its unknown sides, and leaves the
// flow as it was.
func apply(t *testing.T, a *Aggregator, now time.Time, flows ...Flow) {
	t.Helper()
	for _, f := range flows {
		batch := []Flow{f}
		placed := make([]Placement, 1)
		a.ApplyPlaced(now, batch, nil, placed)
		want := Placement{Class: resolve.Classify(f.Src, f.Dst)}
		if f.Src.Kind == resolve.KindUnknown {
			want.Unknown |= SrcUnknown
		}
		if f.Dst.Kind == resolve.KindUnknown {
			want.Unknown |= DstUnknown
		}
		if placed[0] != want {
			t.Errorf("%s -> %s: placed %+v, want %+v", f.Src.Pod+f.Src.Workload, f.Dst.Pod+f.Dst.Workload, placed[0], want)
		}
		if batch[0] != f {
			t.Errorf("%s -> %s: Apply changed the caller's flow to %+v", f.Src.Pod+f.Src.Workload, f.Dst.Pod+f.Dst.Workload, batch[0])
		}
	}
}

// render prints series as sorted exposition lines, the form the tests
// compare against.
func render(series []remotewrite.Series) []string {
	out := make([]string, 0, len(series))
	for _, s := range series {
		var b strings.Builder
		if len(s.Labels) == 0 || s.Labels[0].Name != "__name__" {
			b.WriteString("MISSING_NAME")
		}
		for i, l := range s.Labels {
			if i == 0 && l.Name == "__name__" {
				b.WriteString(l.Value + "{")
				continue
			}
			if i > 1 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, "%s=%q", l.Name, l.Value)
		}
		fmt.Fprintf(&b, "} %g", s.Value)
		out = append(out, b.String())
	}
	slices.Sort(out)
	return out
}

const (
	pairWebDB = `class="cross-zone",dst_kind="pod",dst_namespace="shop",dst_pod="db-0",dst_workload="db",dst_workload_kind="StatefulSet",dst_zone="b",src_kind="pod",src_namespace="shop",src_pod="web-1",src_workload="web",src_workload_kind="Deployment",src_zone="a"`
)

func TestAggregate(t *testing.T) {
	for _, tc := range []struct {
		name     string
		allPairs bool
		max      int
		flows    []Flow
		want     []string
		folded   float64
	}{{
		name:  "cross-zone pod pair",
		max:   10,
		flows: []Flow{fl(webA, dbB, resolve.ClassCrossZone, 1000, 10), fl(webA, dbB, resolve.ClassCrossZone, 500, 5)},
		want: []string{
			`kubezonnet_pod_pair_bytes_total{` + pairWebDB + `} 1500`,
			`kubezonnet_pod_pair_packets_total{` + pairWebDB + `} 15`,
			`kubezonnet_zone_pair_bytes_total{dst_zone="b",src_zone="a"} 1500`,
			`kubezonnet_zone_pair_packets_total{dst_zone="b",src_zone="a"} 15`,
			`pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-1"} 1500`,
		},
	}, {
		name:  "same-zone pair only in zone series by default",
		max:   10,
		flows: []Flow{fl(webA, dbA, resolve.ClassSameZone, 700, 7)},
		want: []string{
			`kubezonnet_zone_pair_bytes_total{dst_zone="a",src_zone="a"} 700`,
			`kubezonnet_zone_pair_packets_total{dst_zone="a",src_zone="a"} 7`,
		},
	}, {
		name:     "same-zone pair with all pairs",
		allPairs: true,
		max:      10,
		flows:    []Flow{fl(webA, dbA, resolve.ClassSameZone, 700, 7)},
		want: []string{
			`kubezonnet_pod_pair_bytes_total{class="same-zone",dst_kind="pod",dst_namespace="shop",dst_pod="db-1",dst_workload="db",dst_workload_kind="StatefulSet",dst_zone="a",src_kind="pod",src_namespace="shop",src_pod="web-1",src_workload="web",src_workload_kind="Deployment",src_zone="a"} 700`,
			`kubezonnet_pod_pair_packets_total{class="same-zone",dst_kind="pod",dst_namespace="shop",dst_pod="db-1",dst_workload="db",dst_workload_kind="StatefulSet",dst_zone="a",src_kind="pod",src_namespace="shop",src_pod="web-1",src_workload="web",src_workload_kind="Deployment",src_zone="a"} 7`,
			`kubezonnet_zone_pair_bytes_total{dst_zone="a",src_zone="a"} 700`,
			`kubezonnet_zone_pair_packets_total{dst_zone="a",src_zone="a"} 7`,
		},
	}, {
		name:  "node and external endpoints leave empty labels out",
		max:   10,
		flows: []Flow{fl(nodeB, inet, resolve.ClassExternal, 42, 1)},
		want: []string{
			`kubezonnet_pod_pair_bytes_total{class="external",dst_kind="external",dst_workload="external",dst_workload_kind="External",dst_zone="external",src_kind="node",src_workload="n-b",src_workload_kind="Node",src_zone="b"} 42`,
			`kubezonnet_pod_pair_packets_total{class="external",dst_kind="external",dst_workload="external",dst_workload_kind="External",dst_zone="external",src_kind="node",src_workload="n-b",src_workload_kind="Node",src_zone="b"} 1`,
			`kubezonnet_zone_pair_bytes_total{dst_zone="external",src_zone="b"} 42`,
			`kubezonnet_zone_pair_packets_total{dst_zone="external",src_zone="b"} 1`,
		},
	}, {
		// A pod sending to a private address outside the cluster (a
		// peered network): billed perhaps, and only the pair says who.
		name:  "unknown destination gets a pod pair by default",
		max:   10,
		flows: []Flow{fl(webA, unknownEP, resolve.ClassUnknown, 64, 1)},
		want: []string{
			`kubezonnet_pod_pair_bytes_total{class="unknown",dst_kind="unknown",dst_workload="unknown",dst_workload_kind="Unknown",dst_zone="unknown",src_kind="pod",src_namespace="shop",src_pod="web-1",src_workload="web",src_workload_kind="Deployment",src_zone="a"} 64`,
			`kubezonnet_pod_pair_packets_total{class="unknown",dst_kind="unknown",dst_workload="unknown",dst_workload_kind="Unknown",dst_zone="unknown",src_kind="pod",src_namespace="shop",src_pod="web-1",src_workload="web",src_workload_kind="Deployment",src_zone="a"} 1`,
			`kubezonnet_zone_pair_bytes_total{dst_zone="unknown",src_zone="a"} 64`,
			`kubezonnet_zone_pair_packets_total{dst_zone="unknown",src_zone="a"} 1`,
		},
	}, {
		name:  "equal labels in distinct endpoint allocations share a series",
		max:   10,
		flows: []Flow{fl(webA, dbB, resolve.ClassCrossZone, 1, 1), fl(webA, dbBCopy, resolve.ClassCrossZone, 2, 1)},
		want: []string{
			`kubezonnet_pod_pair_bytes_total{` + pairWebDB + `} 3`,
			`kubezonnet_pod_pair_packets_total{` + pairWebDB + `} 2`,
			`kubezonnet_zone_pair_bytes_total{dst_zone="b",src_zone="a"} 3`,
			`kubezonnet_zone_pair_packets_total{dst_zone="b",src_zone="a"} 2`,
			`pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-1"} 3`,
		},
	}, {
		name:   "pairs beyond the limit fold into the workload pair",
		max:    1,
		flows:  []Flow{fl(webA, dbB, resolve.ClassCrossZone, 10, 1), fl(webA2, dbB, resolve.ClassCrossZone, 20, 2), fl(webA2, dbB, resolve.ClassCrossZone, 5, 1)},
		folded: 1,
		want: []string{
			`kubezonnet_pod_pair_bytes_total{` + pairWebDB + `} 10`,
			`kubezonnet_pod_pair_bytes_total{class="cross-zone",dst_kind="pod",dst_namespace="shop",dst_pod="_overflow",dst_workload="db",dst_workload_kind="StatefulSet",dst_zone="b",src_kind="pod",src_namespace="shop",src_pod="_overflow",src_workload="web",src_workload_kind="Deployment",src_zone="a"} 25`,
			`kubezonnet_pod_pair_packets_total{` + pairWebDB + `} 1`,
			`kubezonnet_pod_pair_packets_total{class="cross-zone",dst_kind="pod",dst_namespace="shop",dst_pod="_overflow",dst_workload="db",dst_workload_kind="StatefulSet",dst_zone="b",src_kind="pod",src_namespace="shop",src_pod="_overflow",src_workload="web",src_workload_kind="Deployment",src_zone="a"} 3`,
			`kubezonnet_zone_pair_bytes_total{dst_zone="b",src_zone="a"} 35`,
			`kubezonnet_zone_pair_packets_total{dst_zone="b",src_zone="a"} 4`,
			`pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-1"} 10`,
			`pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-2"} 25`,
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			reg := metrics.New()
			a, err := New(Config{AllPairs: tc.allPairs, MaxPodPairs: tc.max, IdleTimeout: time.Hour}, reg)
			if err != nil {
				t.Fatal(err)
			}
			// One flow per Apply and all in one Apply must agree.
			apply(t, a, time.Now(), tc.flows...)
			got := render(a.AppendSeries(nil))
			slices.Sort(tc.want)
			if !slices.Equal(got, tc.want) {
				t.Errorf("series:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(tc.want, "\n     "))
			}
			if v := counterValue(reg, "kubezonnet_server_pod_pairs_folded_total"); v != tc.folded {
				t.Errorf("folded = %v, want %v", v, tc.folded)
			}
		})
	}
}

func counterValue(reg *metrics.Registry, name string) float64 {
	v := -1.0
	reg.Each(func(n string, _ []metrics.Label, value float64) {
		if n == name {
			v = value
		}
	})
	return v
}

func TestExpiry(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	reg := metrics.New()
	a, err := New(Config{MaxPodPairs: 1, IdleTimeout: time.Minute, Now: func() time.Time { return now }}, reg)
	if err != nil {
		t.Fatal(err)
	}
	apply(t, a, now, fl(webA, dbB, resolve.ClassCrossZone, 10, 1))
	now = now.Add(30 * time.Second)
	apply(t, a, now, fl(nodeB, inet, resolve.ClassExternal, 5, 1))
	if n := len(a.AppendSeries(nil)); n != 9 {
		t.Fatalf("before expiry: %d series, want 9", n)
	}
	// 61s after the first flow: the web->db series (and its zone pair and
	// compat series) are idle, the external ones are not.
	now = now.Add(31 * time.Second)
	got := render(a.AppendSeries(nil))
	want := []string{
		`kubezonnet_pod_pair_bytes_total{class="external",dst_kind="external",dst_workload="external",dst_workload_kind="External",dst_zone="external",src_kind="node",src_workload="n-b",src_workload_kind="Node",src_zone="b"} 5`,
		`kubezonnet_pod_pair_packets_total{class="external",dst_kind="external",dst_workload="external",dst_workload_kind="External",dst_zone="external",src_kind="node",src_workload="n-b",src_workload_kind="Node",src_zone="b"} 1`,
		`kubezonnet_zone_pair_bytes_total{dst_zone="external",src_zone="b"} 5`,
		`kubezonnet_zone_pair_packets_total{dst_zone="external",src_zone="b"} 1`,
	}
	if !slices.Equal(got, want) {
		t.Fatalf("after expiry:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
	}
	if v := counterValue(reg, "kubezonnet_server_series_expired_total"); v != 3 {
		t.Errorf("expired = %v, want 3", v)
	}
	// The pod-pair slot was freed: the pair comes back as its own series
	// (not folded) and starts from zero, as a new series should.
	apply(t, a, now, fl(webA, dbB, resolve.ClassCrossZone, 7, 1))
	got = render(a.AppendSeries(nil))
	if !slices.Contains(got, `kubezonnet_pod_pair_bytes_total{`+pairWebDB+`} 7`) {
		t.Errorf("re-created pair missing:\n%s", strings.Join(got, "\n"))
	}
	if v := counterValue(reg, "kubezonnet_server_pod_pairs_folded_total"); v != 0 {
		t.Errorf("folded = %v, want 0", v)
	}
}

// TestLabelsImmutable checks that a later update never changes label
// slices handed out before (the pusher keeps them).
func TestLabelsImmutable(t *testing.T) {
	a, err := New(Config{MaxPodPairs: 10, IdleTimeout: time.Hour}, metrics.New())
	if err != nil {
		t.Fatal(err)
	}
	apply(t, a, time.Now(), fl(webA, dbB, resolve.ClassCrossZone, 1, 1))
	first := a.AppendSeries(nil)
	before := render(first)
	apply(t, a, time.Now(), fl(webA2, dbB, resolve.ClassCrossZone, 1, 1), fl(nodeB, inet, resolve.ClassExternal, 1, 1))
	second := a.AppendSeries(nil)
	for i := range first {
		first[i].Value = 0 // values are copies; only labels are shared
	}
	after := render(first)
	for i := range before {
		// strip values before comparing
		b, _, _ := strings.Cut(before[i], "} ")
		c, _, _ := strings.Cut(after[i], "} ")
		if b != c {
			t.Errorf("labels changed: %s -> %s", b, c)
		}
	}
	if len(second) <= len(first) {
		t.Errorf("second snapshot has %d series, want more than %d", len(second), len(first))
	}
}

// TestExpiryByChunks: a push's expiry (expire) goes a chunk of series,
// and a chunk of routes, per hold of the lock; it ends where the one-hold
// expiry ends (Expire), over more series and routes than a chunk holds.
// Meanwhile ingest may meet a route to a series just expired: its flows
// go to the pair's new series, not to the expired one.
func TestExpiryByChunks(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	const n = routeChunk + 904 // routes, and pod pairs: two chunks of series and more
	srcs, dsts := pods(n, "a", "web"), pods(n, "b", "db")
	run := func(t *testing.T, chunked bool) []string {
		reg := metrics.New()
		a, err := New(Config{MaxPodPairs: 2 * n, IdleTimeout: time.Minute, Now: func() time.Time { return now }}, reg)
		if err != nil {
			t.Fatal(err)
		}
		for i := range n {
			apply(t, a, now, cf(srcs[i], dsts[i], 10, 1))
		}
		// Every other pair talks again 40 s later; the rest are idle
		// 61 s after the first flows.
		for i := 0; i < n; i += 2 {
			apply(t, a, now.Add(40*time.Second), cf(srcs[i], dsts[i], 5, 1))
		}
		later := now.Add(61 * time.Second)
		if chunked {
			a.expire(later)
		} else {
			a.Expire(later)
		}
		// An idle pair's series, and its source pod's cross-zone one.
		if got, want := counterValue(reg, "kubezonnet_server_series_expired_total"), float64(n/2*2); got != want {
			t.Errorf("expired %v series, want %v (the idle pairs' and their sources')", got, want)
		}
		if len(a.routes) != n/2 {
			t.Errorf("%d routes left, want %d", len(a.routes), n/2)
		}
		return render(a.AppendSeries(nil))
	}
	whole, chunked := run(t, false), run(t, true)
	if !slices.Equal(whole, chunked) {
		t.Errorf("series after the expiry by chunks differ from the one-hold expiry's (%d against %d)", len(chunked), len(whole))
	}

	// The window: a series expired, its route not dropped yet.
	a, err := New(Config{MaxPodPairs: 10, IdleTimeout: time.Minute, Now: func() time.Time { return now }}, metrics.New())
	if err != nil {
		t.Fatal(err)
	}
	apply(t, a, now, fl(webA, dbB, resolve.ClassCrossZone, 10, 1))
	later := now.Add(61 * time.Second)
	a.mu.Lock()
	a.noteExpired(later, a.store.Expire(later.Add(-time.Minute).UnixNano(), nil))
	a.mu.Unlock()
	if len(a.routes) != 1 {
		t.Fatalf("%d routes, want the one to the expired series", len(a.routes))
	}
	apply(t, a, later, fl(webA, dbB, resolve.ClassCrossZone, 7, 1))
	got := render(a.AppendSeries(nil))
	if !slices.Contains(got, `kubezonnet_pod_pair_bytes_total{`+pairWebDB+`} 7`) ||
		!slices.Contains(got, `kubezonnet_zone_pair_bytes_total{dst_zone="b",src_zone="a"} 7`) {
		t.Errorf("a flow over the route to an expired series went elsewhere than the pair's new series:\n%s", strings.Join(got, "\n"))
	}
}
