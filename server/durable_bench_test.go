package server

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/logging"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/wire"
	"github.com/kubezonnet/kubezonnet/server/aggregate"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// BenchmarkIngestDurable compares the ingest path with the write-ahead log
// off and on, in one process: agents goroutines each decode, claim, apply
// and (log on) wait for their batch's record to be durable before taking
// the next, as the handler does before it answers. Run it on one core
// (-cpu 1) for the per-core figure; the log's committer shares that core.
// flows/s is the figure to compare; fsyncs/batch shows group commit.
func BenchmarkIngestDurable(b *testing.B) {
	for _, agents := range []int{1, 8} {
		for _, on := range []bool{false, true} {
			name := fmt.Sprintf("agents=%d/log=off", agents)
			if on {
				name = fmt.Sprintf("agents=%d/log=on", agents)
			}
			b.Run(name, func(b *testing.B) { benchDurable(b, agents, on) })
		}
	}
}

func benchDurable(b *testing.B, agents int, logOn bool) {
	res, addrs := benchResolver()
	cfg := testConfig()
	cfg.MaxPodPairs = 1_000_000
	cfg.MaxIncarnations = 10_000
	if logOn {
		cfg.StateDir = b.TempDir()
	}
	reg := metrics.New()
	srv, err := newServer(&cfg, deps{resolver: res, auth: noAuth{}, reg: reg, log: logging.Discard()})
	if err != nil {
		b.Fatal(err)
	}
	if srv.state != nil {
		b.Cleanup(func() { srv.state.close() })
	}
	in := srv.ingest
	_, body := benchBody(addrs)
	apply := func(wk *work, a int, s uint64) {
		ingestBatch(b, srv, wk, body, fmt.Sprint("inc-", a), s)
	}
	wk := in.pool.Get().(*work)
	apply(wk, -1, 1) // warm up: routes, series, buffers
	in.pool.Put(wk)
	fsyncs0 := reg0(reg, "kubezonnet_server_state_fsyncs_total")
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	runAgents(b, srv, agents, apply)
	b.StopTimer()
	flows := float64(b.N) * batchFlows
	sec := b.Elapsed().Seconds()
	b.ReportMetric(flows/sec, "flows/s")
	b.ReportMetric(float64(cpuTime()-cpu0)/flows, "cpu-ns/flow")
	if logOn {
		f := reg0(reg, "kubezonnet_server_state_fsyncs_total") - fsyncs0
		b.ReportMetric(f/float64(b.N), "fsyncs/batch")
		b.ReportMetric(reg0(reg, "kubezonnet_server_state_record_bytes_total")/(float64(b.N+1)*batchFlows), "log-bytes/flow")
	}
}

// runAgents runs b.N batches spread over agents goroutines, each with its
// own pooled work and sequence numbers from 1: send(wk, a, seq) sends
// agent a's batch.
func runAgents(b *testing.B, srv *Server, agents int, send func(wk *work, a int, seq uint64)) {
	in := srv.ingest
	var next atomic.Int64
	var wg sync.WaitGroup
	for a := range agents {
		wg.Go(func() {
			wk := in.pool.Get().(*work)
			defer in.pool.Put(wk)
			for s := uint64(1); next.Add(1) <= int64(b.N); s++ {
				send(wk, a, s)
			}
		})
	}
	wg.Wait()
}

// ingestBatch is what the ingest handler does with a request body once it
// is authenticated, as agent incarnation inc's batch seq: decode, claim,
// apply, and wait for the batch's record to be durable (with a state
// directory).
func ingestBatch(b *testing.B, srv *Server, wk *work, body []byte, inc string, seq uint64) {
	in := srv.ingest
	if err := wk.dec.Decode(body, &wk.batch); err != nil {
		b.Error(err)
		return
	}
	wk.batch.Incarnation = inc
	wk.batch.Seq = seq
	if _, hold := in.screen(wk); hold {
		b.Error("batch held")
		return
	}
	now := time.Now()
	t, ok := in.dedup.claim(wk.batch.Node, inc, seq, now)
	if !ok {
		b.Error("batch claimed twice")
		return
	}
	pos := in.apply(wk, now)
	t.applied(pos)
	if srv.state != nil {
		if err := srv.state.Wait(context.Background(), pos); err != nil {
			b.Error(err)
		}
	}
}

// BenchmarkDurableManyAgents is 1,000 agents sending small batches (100
// flows) at once, each waiting for its acknowledgement before the next:
// the fsyncs per second the log does under that load (one per
// group-commit round), and how many batches share one.
func BenchmarkDurableManyAgents(b *testing.B) {
	const agents, perBatch = 1000, 100
	res, addrs := benchResolver()
	cfg := testConfig()
	cfg.MaxPodPairs = 1_000_000
	cfg.MaxIncarnations = 10_000
	cfg.StateDir = b.TempDir()
	reg := metrics.New()
	srv, err := newServer(&cfg, deps{resolver: res, auth: noAuth{}, reg: reg, log: logging.Discard()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.state.close() })
	full, _ := benchBody(addrs)
	var enc wire.Encoder
	bodies := make([][]byte, agents)
	for a := range agents {
		bt := *full
		bt.Flows = full.Flows[(a*perBatch)%len(full.Flows):][:perBatch]
		bodies[a] = append([]byte(nil), enc.Encode(&bt)...)
	}
	fsyncs0 := reg0(reg, "kubezonnet_server_state_fsyncs_total")
	b.ResetTimer()
	runAgents(b, srv, agents, func(wk *work, a int, s uint64) {
		ingestBatch(b, srv, wk, bodies[a], fmt.Sprint("agent-", a), s)
	})
	b.StopTimer()
	f := reg0(reg, "kubezonnet_server_state_fsyncs_total") - fsyncs0
	sec := b.Elapsed().Seconds()
	b.ReportMetric(f/sec, "fsyncs/s")
	b.ReportMetric(float64(b.N)/sec, "batches/s")
	b.ReportMetric(float64(b.N)/f, "batches/fsync")
}

// BenchmarkRestart1M is the restart of a server holding 1,000,000 live
// pod pairs (2,000,000 pod-pair series, plus zone-pair and per-pod
// series): the time from newServer to a server ready to ingest, with the
// state in a checkpoint (the usual case: the shutdown or the periodic
// checkpoint wrote it) and with all of it still in the log (a crash just
// before the first checkpoint). It reports the state's size on disk.
func BenchmarkRestart1M(b *testing.B) {
	const side = 1000 // side x side pod pairs
	if testing.Short() {
		b.Skip("builds 1,000,000 pod pairs")
	}
	for _, mode := range []string{"checkpoint", "log"} {
		b.Run("state="+mode, func(b *testing.B) {
			dir := b.TempDir()
			res := newFakeResolver()
			var src, dst []*resolve.Endpoint
			for i := range side {
				src = append(src, podEP(fmt.Sprintf("ns-%d", i%20), fmt.Sprintf("client-%d", i), fmt.Sprintf("client-wl-%d", i/10), "Deployment", fmt.Sprintf("node-a%d", i%30), "zone-a"))
				dst = append(dst, podEP(fmt.Sprintf("ns-%d", i%20), fmt.Sprintf("server-%d", i), fmt.Sprintf("server-wl-%d", i/10), "StatefulSet", fmt.Sprintf("node-b%d", i%30), "zone-b"))
			}
			cfg := testConfig()
			cfg.MaxPodPairs = side * side
			cfg.StateDir = dir
			reg := metrics.New()
			srv, err := newServer(&cfg, deps{resolver: res, auth: noAuth{}, reg: reg, log: logging.Discard()})
			if err != nil {
				b.Fatal(err)
			}
			flows := make([]aggregate.Flow, 0, side)
			var pos uint64
			now := time.Now()
			for i, s := range src {
				flows = flows[:0]
				for _, d := range dst {
					flows = append(flows, aggregate.Flow{Src: s, Dst: d, Counts: flow.Counts{Bytes: 1000, Packets: 1}})
				}
				pos = srv.agg.Apply(now, flows, &aggregate.BatchID{Node: "node-a", Incarnation: "x", Seq: uint64(i + 1)})
			}
			if err := srv.state.Wait(context.Background(), pos); err != nil {
				b.Fatal(err)
			}
			cpSec := 0.0
			if mode == "checkpoint" {
				start := time.Now()
				if err := srv.state.checkpoint(context.Background()); err != nil {
					b.Fatal(err)
				}
				cpSec = time.Since(start).Seconds()
			}
			live := srv.agg.Len()
			if err := srv.state.close(); err != nil {
				b.Fatal(err)
			}
			srv = nil
			walMiB := float64(dirSize(b, filepath.Join(dir, "wal"))) / (1 << 20)
			cps, _ := filepath.Glob(filepath.Join(dir, "checkpoint.*"))
			var cpSize int64
			for _, c := range cps {
				cpSize += fileSize(b, c)
			}
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				reg := metrics.New()
				b.StartTimer()
				s2, err := newServer(&cfg, deps{resolver: res, auth: noAuth{}, reg: reg, log: logging.Discard()})
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if got := s2.agg.Len(); got != live {
					b.Fatalf("restored %d series, want %d", got, live)
				}
				s2.state.close()
				b.StartTimer()
			}
			b.ReportMetric(float64(live), "series")
			b.ReportMetric(walMiB, "wal-MiB")
			if cpSec > 0 {
				b.ReportMetric(cpSec, "checkpoint-s")
			}
			b.ReportMetric(float64(cpSize)/(1<<20), "checkpoint-MiB")
		})
	}
}

func dirSize(b *testing.B, dir string) int64 {
	ents, err := os.ReadDir(dir)
	if err != nil {
		b.Fatal(err)
	}
	var n int64
	for _, e := range ents {
		n += fileSize(b, filepath.Join(dir, e.Name()))
	}
	return n
}

func fileSize(b *testing.B, path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		b.Fatal(err)
	}
	return fi.Size()
}
