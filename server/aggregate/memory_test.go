package aggregate

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"runtime/pprof"
	"sync"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// memServerProfile, when set, makes BenchmarkMemoryServer write a heap
// profile at its measuring point (after the second push and a GC), one
// file per sub-benchmark: <path>.pairs=<n>.
var memServerProfile = flag.String("memserver.heapprofile", "",
	"write BenchmarkMemoryServer's heap profile at its measuring point to this path prefix")

// pushCount is what a receiver saw of one push.
type pushCount struct {
	requests, series, podPair, stale, badSamples int
	bytes, raw                                   int // compressed and decoded body bytes
}

// countingReceiver is a remote-write endpoint on 127.0.0.1 that decodes
// every request (snappy, then the WriteRequest's TimeSeries) and counts
// what it got, answering 204. Decoding fully is what keeps
// BenchmarkMemoryServer honest: its heap figure is only worth something if
// the pusher really sent every series.
type countingReceiver struct {
	srv *httptest.Server

	mu  sync.Mutex
	cur pushCount
	err error
}

func newCountingReceiver(tb testing.TB) *countingReceiver {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	r := &countingReceiver{}
	r.srv = httptest.NewUnstartedServer(http.HandlerFunc(r.serve))
	r.srv.Listener.Close()
	r.srv.Listener = ln
	r.srv.Start()
	tb.Cleanup(r.srv.Close)
	return r
}

func (r *countingReceiver) serve(w http.ResponseWriter, req *http.Request) {
	fail := func(err error) {
		r.mu.Lock()
		r.err = errors.Join(r.err, err)
		r.mu.Unlock()
		http.Error(w, err.Error(), http.StatusBadRequest)
	}
	body, z, err := testutil.ReadSnappy(req.Body)
	if err != nil {
		fail(err)
		return
	}
	var c pushCount
	c.requests = 1
	c.bytes, c.raw = z, len(body)
	var rs remotewrite.RawSeries
	err = remotewrite.WalkSeries(body, &rs, func(s *remotewrite.RawSeries) error {
		c.series++
		switch string(s.Label("__name__")) {
		case MetricPodPairBytes, MetricPodPairPackets:
			c.podPair++
		}
		// One sample, or a new series' zero at its creation first.
		zero := len(s.Samples) == 2 && s.Samples[0].Value == 0 && s.Samples[0].Timestamp < s.Samples[1].Timestamp
		if len(s.Samples) != 1 && !zero {
			c.badSamples++
			return nil
		}
		if remotewrite.IsStaleNaN(s.Samples[len(s.Samples)-1].Value) {
			c.stale++
		}
		return nil
	})
	if err != nil {
		fail(err)
		return
	}
	r.mu.Lock()
	r.cur.requests += c.requests
	r.cur.series += c.series
	r.cur.podPair += c.podPair
	r.cur.stale += c.stale
	r.cur.badSamples += c.badSamples
	r.cur.bytes += c.bytes
	r.cur.raw += c.raw
	r.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// take returns what was received since the last take, and any error.
func (r *countingReceiver) take() (pushCount, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c, err := r.cur, r.err
	r.cur, r.err = pushCount{}, nil
	return c, err
}

// BenchmarkMemoryServer is the server's whole heap for live pod-pair
// series: the aggregator built as in BenchmarkMemoryPodPairs, plus a real
// remotewrite.Pusher with the aggregator as its source after two pushes to
// a local receiver (what a push keeps between pushes: the store's capture
// plan and the pusher's encoding buffers). Heap is runtime.MemStats.HeapAlloc after a GC, as
// differences: agg-MiB is the aggregator alone, pusher-MiB what the pusher
// adds, heap-MiB both; heap-B/series divides that by every series pushed
// (pod-pair, per-pod and zone-pair). Each push must reach the receiver
// whole (every series, one sample each, no stale marker) or the benchmark
// fails. 500k pairs are 1,000,000 pod-pair series, 1M pairs 2,000,000. Run
// with -benchtime=1x: one op builds the whole set and pushes it twice.
func BenchmarkMemoryServer(b *testing.B) {
	for _, n := range []int{500, 1000} { // sources; destinations are 1000
		const dsts = 1000
		b.Run(fmt.Sprintf("pairs=%d", n*dsts), func(b *testing.B) {
			src, dst := pods(n, "eu-west-1a", "web"), pods(dsts, "eu-west-1b", "db")
			rcv := newCountingReceiver(b)
			// Every pair is cross-zone: 2 pod-pair series each, one
			// per-pod series per source pod, one zone-pair twin.
			wantPodPair := 2 * n * dsts
			wantSeries := wantPodPair + n + 2
			for range b.N {
				var base, withAgg, withPusher runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&base)

				reg := metrics.New()
				a, err := New(Config{MaxPodPairs: n * dsts, IdleTimeout: time.Hour}, reg)
				if err != nil {
					b.Fatal(err)
				}
				flows := fillPairs(a, src, dst)
				if a.store.Count(kindPair) != n*dsts {
					b.Fatalf("%d pod pairs, want %d", a.store.Count(kindPair), n*dsts)
				}
				runtime.GC()
				runtime.ReadMemStats(&withAgg)

				cfg := remotewrite.DefaultPusherConfig()
				cfg.Endpoints = []remotewrite.EndpointConfig{{URL: rcv.srv.URL + "/api/v1/write"}}
				p, err := remotewrite.NewPusher(cfg, []remotewrite.Source{a}, reg, nil)
				if err != nil {
					b.Fatal(err)
				}
				for push := 1; push <= 2; push++ {
					t0 := time.Now()
					p.Push()
					encoded := time.Since(t0)
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
					err := p.Wait(ctx)
					cancel()
					delivered := time.Since(t0)
					if err != nil {
						b.Fatalf("push %d: %v", push, err)
					}
					got, err := rcv.take()
					if err != nil {
						b.Fatalf("push %d: receiver: %v", push, err)
					}
					if got.series != wantSeries || got.podPair != wantPodPair || got.stale != 0 || got.badSamples != 0 {
						b.Fatalf("push %d: receiver got %+v, want %d series of which %d pod-pair, no stale marker, one sample each",
							push, got, wantSeries, wantPodPair)
					}
					b.Logf("push %d: %d series in %d requests (%d MiB, %d MiB decompressed); encoded in %v, delivered in %v",
						push, got.series, got.requests, got.bytes>>20, got.raw>>20, encoded.Round(time.Millisecond), delivered.Round(time.Millisecond))
				}
				runtime.GC()
				runtime.ReadMemStats(&withPusher)
				if *memServerProfile != "" {
					writeHeapProfile(b, fmt.Sprintf("%s.pairs=%d", *memServerProfile, n*dsts))
				}

				agg := float64(withAgg.HeapAlloc) - float64(base.HeapAlloc)
				pusher := float64(withPusher.HeapAlloc) - float64(withAgg.HeapAlloc)
				b.ReportMetric((agg+pusher)/(1<<20), "heap-MiB")
				b.ReportMetric(agg/(1<<20), "agg-MiB")
				b.ReportMetric(pusher/(1<<20), "pusher-MiB")
				b.ReportMetric((agg+pusher)/float64(wantSeries), "heap-B/series")
				b.ReportMetric(float64(wantSeries), "series")
				runtime.KeepAlive(a)
				runtime.KeepAlive(flows)

				// Stop the pusher's goroutines (Flush pushes a third
				// time, after the measurement).
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
				if err := p.Flush(ctx); err != nil {
					b.Fatalf("flush: %v", err)
				}
				cancel()
				if _, err := rcv.take(); err != nil {
					b.Fatalf("flush: receiver: %v", err)
				}
			}
		})
	}
}

func writeHeapProfile(tb testing.TB, path string) {
	tb.Helper()
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		tb.Fatal(err)
	}
}
