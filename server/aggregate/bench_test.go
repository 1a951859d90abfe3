package aggregate

import (
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// pods returns n pod endpoints with realistic name lengths in zone.
func pods(n int, zone, prefix string) []*resolve.Endpoint {
	out := make([]*resolve.Endpoint, n)
	for i := range out {
		out[i] = &resolve.Endpoint{Kind: resolve.KindPod, Namespace: fmt.Sprintf("team-%d", i%20),
			Pod: fmt.Sprintf("%s-%d-7d9f8c6b5-x%04d", prefix, i/10, i), Workload: fmt.Sprintf("%s-%d", prefix, i/10),
			WorkloadKind: "Deployment", Node: fmt.Sprintf("node-%s-%d", zone, i%30), Zone: zone, Region: "eu-west-1"}
	}
	return out
}

// BenchmarkApply: aggregation alone, one op per flow, 10,000 live pairs.
func BenchmarkApply(b *testing.B) {
	a, err := New(Config{MaxPodPairs: 1 << 20, IdleTimeout: time.Hour}, metrics.New())
	if err != nil {
		b.Fatal(err)
	}
	src, dst := pods(100, "eu-west-1a", "web"), pods(100, "eu-west-1b", "db")
	flows := make([]Flow, 0, 10_000)
	for i := range 10_000 {
		flows = append(flows, Flow{Src: src[i%100], Dst: dst[i/100], Counts: flow.Counts{Bytes: 1500, Packets: 1}})
	}
	now := time.Now()
	a.Apply(now, flows, nil)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i += len(flows) {
		n := min(len(flows), b.N-i)
		a.Apply(now, flows[:n], nil)
	}
}

// BenchmarkMemoryPodPairs creates live cross-zone pod pairs (each one a
// kubezonnet_pod_pair_bytes_total and a _packets_total series, plus the
// zone-pair and per-pod series they feed) and reports the heap they hold,
// from runtime.MemStats after a GC: per pair and in total. 500k pairs are
// 1,000,000 pod-pair series; 1M pairs are 2,000,000. Run with
// -benchtime=1x: one op builds the whole set.
func BenchmarkMemoryPodPairs(b *testing.B) {
	for _, n := range []int{500, 1000} { // sources; destinations are 1000
		const dsts = 1000
		b.Run(fmt.Sprintf("pairs=%d", n*dsts), func(b *testing.B) {
			src, dst := pods(n, "eu-west-1a", "web"), pods(dsts, "eu-west-1b", "db")
			for range b.N {
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				a, err := New(Config{MaxPodPairs: n * dsts, IdleTimeout: time.Hour}, metrics.New())
				if err != nil {
					b.Fatal(err)
				}
				flows := fillPairs(a, src, dst)
				runtime.GC()
				runtime.ReadMemStats(&after)
				if a.store.Count(kindPair) != n*dsts {
					b.Fatalf("%d pod pairs, want %d", a.store.Count(kindPair), n*dsts)
				}
				held := float64(after.HeapAlloc) - float64(before.HeapAlloc)
				b.ReportMetric(held/float64(n*dsts), "heap-B/pair")
				b.ReportMetric(held/(1<<20), "heap-MiB")
				runtime.KeepAlive(a)
				runtime.KeepAlive(flows)
			}
		})
	}
}

// fillPairs makes every src -> dst pair a live cross-zone pod pair of a and
// returns the flow buffer it used (callers keep it alive while measuring).
func fillPairs(a *Aggregator, src, dst []*resolve.Endpoint) []Flow {
	now := time.Now()
	flows := make([]Flow, len(dst))
	for i := range src {
		for j := range dst {
			flows[j] = Flow{Src: src[i], Dst: dst[j], Counts: flow.Counts{Bytes: 1, Packets: 1}}
		}
		a.Apply(now, flows, nil)
	}
	return flows
}

// BenchmarkLockHold is how long the aggregator's lock is held, ingest
// stalled, by what walks every series: a push's capture (expiry
// included), a checkpoint's view, an expiry pass. One op is one of each
// over 1,000,000 live pod pairs; the ns/op metrics are per step.
func BenchmarkLockHold(b *testing.B) {
	a, err := New(Config{MaxPodPairs: 1 << 20, IdleTimeout: time.Hour}, metrics.New())
	if err != nil {
		b.Fatal(err)
	}
	fillPairs(a, pods(1000, "eu-west-1a", "web"), pods(1000, "eu-west-1b", "db"))
	var capture, view, expire time.Duration
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		a.capture(int64(i + 1))
		t1 := time.Now()
		snap := a.Snapshot(nil)
		t2 := time.Now()
		a.Expire(time.Now())
		t3 := time.Now()
		snap.Release()
		capture += t1.Sub(t0)
		view += t2.Sub(t1)
		expire += t3.Sub(t2)
	}
	b.ReportMetric(float64(capture.Nanoseconds())/float64(b.N), "capture-ns/op")
	b.ReportMetric(float64(view.Nanoseconds())/float64(b.N), "view-ns/op")
	b.ReportMetric(float64(expire.Nanoseconds())/float64(b.N), "expire-ns/op")
}
