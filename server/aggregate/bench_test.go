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

// BenchmarkLockHold is how long ingest waits for the aggregator's lock
// while what reads every series runs: a push's capture (expiry included;
// the encoding runs after it) and a checkpoint's view, over 1,000,000
// live pod pairs. One op is one of each, their wall times reported per
// step. Meanwhile a goroutine takes the lock as a batch of ingest does,
// every 20 µs, and reports its longest wait (wait-max-ns, over all ops);
// run it with -cpu 2, so that it waits on the lock and not on the CPU.
// chunked is the aggregator's capture (expiry included) and Snapshot,
// which take the lock for one chunk of series at a time; whole, the
// baseline, is the same reads in one hold of the lock (expireLocked, the
// store's Capture and View).
func BenchmarkLockHold(b *testing.B) {
	a, err := New(Config{MaxPodPairs: 1 << 20, IdleTimeout: time.Hour}, metrics.New())
	if err != nil {
		b.Fatal(err)
	}
	fillPairs(a, pods(1000, "eu-west-1a", "web"), pods(1000, "eu-west-1b", "db"))
	steps := map[string]struct{ capture, view func(ts int64) }{
		"chunked": {
			capture: func(ts int64) { a.capture(ts) },
			view:    func(int64) { a.Snapshot(nil).Release() },
		},
		"whole": {
			capture: func(ts int64) {
				a.mu.Lock()
				a.expireLocked(time.Now())
				a.store.Capture(ts, a.delivered)
				a.mu.Unlock()
			},
			view: func(int64) {
				a.mu.Lock()
				v := a.store.View()
				a.store.Unpin(v)
				a.mu.Unlock()
			},
		},
	}
	ts := int64(0)
	for _, name := range []string{"chunked", "whole"} {
		step := steps[name]
		b.Run(name, func(b *testing.B) {
			stop := make(chan struct{})
			waited := make(chan time.Duration)
			go func() {
				var most time.Duration
				for {
					select {
					case <-stop:
						waited <- most
						return
					default:
					}
					t0 := time.Now()
					a.mu.Lock()
					most = max(most, time.Since(t0))
					a.mu.Unlock()
					time.Sleep(20 * time.Microsecond)
				}
			}()
			var capture, view time.Duration
			b.ResetTimer()
			for range b.N {
				ts++
				t0 := time.Now()
				step.capture(ts)
				t1 := time.Now()
				step.view(ts)
				capture += t1.Sub(t0)
				view += time.Since(t1)
			}
			b.StopTimer()
			close(stop)
			b.ReportMetric(float64(capture.Nanoseconds())/float64(b.N), "capture-ns/op")
			b.ReportMetric(float64(view.Nanoseconds())/float64(b.N), "view-ns/op")
			b.ReportMetric(float64((<-waited).Nanoseconds()), "wait-max-ns")
		})
	}
}
