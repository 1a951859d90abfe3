package server

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/logging"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/wire"
	"github.com/kubezonnet/kubezonnet/server/flowlog"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// Shape of the benchmark cluster: 10,000 pods on 100 nodes in 3 zones.
// The agent of node-0 reports flows from its 100 pods to random pods of
// the cluster, one batch of batchFlows flows per operation, the same flows
// each time with a new seq (an agent in steady state).
const (
	benchPods   = 10_000
	benchNodes  = 100
	batchFlows  = 10_000
	benchZones  = 3
	benchSeed   = 42
	benchReport = "node-0"
)

func benchResolver() (*fakeResolver, []netip.Addr) {
	res := newFakeResolver()
	addrs := make([]netip.Addr, benchPods)
	for i := range benchPods {
		node := i % benchNodes
		ip := netip.AddrFrom4([4]byte{10, byte(1 + i>>16), byte(i >> 8), byte(i)})
		addrs[i] = ip
		res.eps[ip] = podEP("ns-"+fmt.Sprint(i%50), fmt.Sprintf("pod-%d", i), fmt.Sprintf("wl-%d", i/10),
			"Deployment", fmt.Sprintf("node-%d", node), fmt.Sprintf("zone-%d", node%benchZones))
	}
	return res, addrs
}

func benchBody(addrs []netip.Addr) (*wire.Batch, []byte) {
	r := rand.New(rand.NewPCG(benchSeed, benchSeed))
	b := batch(benchReport, 1)
	for range batchFlows {
		src := addrs[benchNodes*r.IntN(benchPods/benchNodes)] // a pod of node-0
		dst := addrs[r.IntN(benchPods)]
		b.Flows = append(b.Flows, flow.Record{
			Key:    flow.Key{Src: src, Dst: dst, Proto: 6, Port: uint16(8000 + r.IntN(4)), PortIsDst: true},
			Counts: flow.Counts{Bytes: uint64(100 + r.IntN(100000)), Packets: uint64(1 + r.IntN(100))},
		})
	}
	return b, encode(b)
}

// benchIngest measures decode (snappy + protobuf + contract) + dedup +
// resolve + classify + aggregate (+ flow log hand-off) per batch, without
// HTTP. ns/flow and flows/s are derived from the batch time.
func benchIngest(b *testing.B, flowLog string) {
	res, _ := benchResolver()
	benchIngestWith(b, res, flowLog)
}

func benchIngestWith(b *testing.B, res Resolver, flowLog string) {
	_, addrs := benchResolver()
	cfg := testConfig()
	cfg.MaxPodPairs = 1_000_000
	reg := metrics.New()
	d := deps{resolver: res, auth: noAuth{}, reg: reg, log: logging.Discard()}
	if flowLog != "" {
		f, err := os.Create(flowLog)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { f.Close() })
		d.flowLog = f
		cfg.FlowLogClasses, _ = flowlog.ParseClasses([]string{resolve.ClassCrossZone.String()})
	}
	srv, err := newServer(&cfg, d)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go srv.runFlowLog(ctx)
	in := srv.ingest
	_, body := benchBody(addrs)
	wk := in.pool.Get().(*work)
	apply := func(s uint64) {
		if err := wk.dec.Decode(body, &wk.batch); err != nil {
			b.Fatal(err)
		}
		// The same body every time, as a new batch: the seq is
		// overridden after decoding so that de-duplication lets it in.
		wk.batch.Seq = s
		if _, hold := in.screen(wk); hold {
			b.Fatal("batch held")
		}
		now := time.Now()
		if t, ok := in.dedup.claim(wk.batch.Node, wk.batch.Incarnation, wk.batch.Seq, now); ok {
			t.applied(in.apply(wk, now))
		}
	}
	// Warm up: routes, series, buffers.
	apply(1)
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		apply(uint64(i + 2))
	}
	cancel()
	if srv.flog != nil {
		<-srv.flog.Done() // the writer's backlog counts in the time
	}
	b.StopTimer()
	sec := b.Elapsed().Seconds()
	flows := float64(b.N) * batchFlows
	// CPU time of the whole process (all threads: GC, the flow log
	// writer) per flow: the cost on a shared machine, where wall time
	// also counts waiting for a core.
	b.ReportMetric(float64(cpuTime()-cpu0)/flows, "cpu-ns/flow")
	b.ReportMetric(sec*1e9/flows, "ns/flow")
	b.ReportMetric(flows/sec, "flows/s")
	b.ReportMetric(2*flows/sec, "samples/s") // bytes and packets: 2 per flow
	if srv.flog != nil {
		b.ReportMetric(reg0(reg, "kubezonnet_server_flow_log_dropped_total")/flows, "dropped/flow")
		b.ReportMetric(reg0(reg, "kubezonnet_server_flow_log_events_total")/flows, "logged/flow")
	}
	if v := reg0(reg, "kubezonnet_server_flows_dropped_total"); v != 0 {
		b.Fatalf("%v flows dropped as foreign", v)
	}
}

// cpuTime returns the user+system CPU time of the process in ns.
func cpuTime() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

func reg0(reg *metrics.Registry, name string) float64 {
	v := 0.0
	reg.Each(func(n string, _ []metrics.Label, value float64) {
		if n == name {
			v += value
		}
	})
	return v
}

// BenchmarkIngestPath: one op is one batch of 10,000 flows, i.e. 10,000
// kubezonnet_flow series of 2 samples (bytes, packets) each; see the
// ns/flow and flows/s metrics. samples/s is 2 x flows/s, the flow samples
// the ingest budget counts (2,000,000 samples/s on one core = 1,000,000
// flows/s). The resolver is the table-driven fake (fake_test.go) holding
// 10,000 pods.
func BenchmarkIngestPath(b *testing.B) { benchIngest(b, "") }

// BenchmarkIngestPathFlowLog adds cross-zone flow logging to a file; the
// writer's backlog is drained inside the measured time.
func BenchmarkIngestPathFlowLog(b *testing.B) {
	benchIngest(b, filepath.Join(b.TempDir(), "flows.log"))
}

// BenchmarkDecodeOnly is the decode share of BenchmarkIngestPath: the same
// batch through wire.Decoder alone (snappy, protobuf walk, contract).
func BenchmarkDecodeOnly(b *testing.B) {
	_, addrs := benchResolver()
	_, body := benchBody(addrs)
	var d wire.Decoder
	var batch wire.Batch
	if err := d.Decode(body, &batch); err != nil { // warm the buffers
		b.Fatal(err)
	}
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	for range b.N {
		if err := d.Decode(body, &batch); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	flows := float64(b.N) * batchFlows
	b.ReportMetric(float64(cpuTime()-cpu0)/flows, "cpu-ns/flow")
	b.ReportMetric(b.Elapsed().Seconds()*1e9/flows, "ns/flow")
}
