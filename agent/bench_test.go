//go:build linux

package agent

import (
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/packet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// BenchmarkEncodeFlush measures what the agent does with the flows of one
// flush once drained: merge into the buffer, take, sort, encode and
// compress, for 100,000 flows; it reports the compressed bytes per flow.
func BenchmarkEncodeFlush(b *testing.B) {
	flows := testutil.ClusterFlows(100_000)
	buf := newBuffer(200_000)
	var enc wire.Encoder
	var scratch []flow.Record
	var size int
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := testutil.CPUTime()
	for i := 0; i < b.N; i++ {
		buf.add(flows)
		scratch = buf.take(scratch)
		body := enc.Encode(&wire.Batch{Node: "ip-10-0-1-23.ec2.internal", Incarnation: "0123456789abcdef", Seq: uint64(i + 1), Time: time.Now(), Flows: scratch})
		size = len(body)
	}
	b.ReportMetric(float64((testutil.CPUTime()-cpu0).Nanoseconds())/float64(b.N), "cpu-ns/op")
	b.ReportMetric(float64(size)/float64(len(flows)), "wire-bytes/flow")
}

// BenchmarkDrainEncodeFlush adds the kernel drain: 100,000 flows are put in
// the datapath (untimed, sent through its hook by an injector, spread over
// the CPUs as a node's senders spread them), then drained, merged, sorted, encoded and
// compressed (timed). The flow table sizes itself for that load in an
// untimed first round (at its cap, 4,096 slots per CPU); the flows beyond
// are records of the flow log, which the datapath's reader adds up partly
// while they are sent, and the drain reads to the end.
func BenchmarkDrainEncodeFlush(b *testing.B) {
	testutil.RequireRoot(b)
	dp, err := bpf.Load(bpf.Config{MaxFlows: 131072})
	if err != nil {
		b.Fatal(err)
	}
	defer dp.Close()
	inj := newInjector(b, dp)
	if err := dp.SetLocalPrefixes([]netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64")}); err != nil {
		b.Fatal(err)
	}
	flows := testutil.ClusterFlows(100_000)
	pkts := make([][]byte, len(flows))
	for i, f := range flows {
		if f.Src.Is4() {
			pkts[i] = packet.IPv4(b, 6, netip.AddrPortFrom(f.Src, 40000), netip.AddrPortFrom(f.Dst, f.Port), 100, 0)
		} else {
			pkts[i] = packet.IPv6(b, 6, netip.AddrPortFrom(f.Src, 40000), netip.AddrPortFrom(f.Dst, f.Port), 100, false)
		}
	}
	buf := newBuffer(200_000)
	var enc wire.Encoder
	var dr bpf.Drained
	var scratch []flow.Record
	var cpu time.Duration
	var sz int
	fill := func() {
		for cpu := range runtime.NumCPU() {
			testutil.OnCPU(b, cpu, func() {
				for i := cpu; i < len(pkts); i += runtime.NumCPU() {
					inj.send(b, pkts[i])
				}
			})
		}
	}
	fill()
	if err := dp.Drain(&dr); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(dr.TableSlots), "slots/cpu")
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		fill()
		b.StartTimer()
		cpu0 := testutil.CPUTime()
		if err := dp.Drain(&dr); err != nil {
			b.Fatal(err)
		}
		buf.add(dr.Flows)
		scratch = buf.take(scratch)
		sz = len(enc.Encode(&wire.Batch{Node: "n", Incarnation: "i", Seq: uint64(i + 1), Time: time.Now(), Flows: scratch}))
		cpu += testutil.CPUTime() - cpu0
		if len(scratch) != len(flows) {
			b.Fatalf("%d flows, want %d", len(scratch), len(flows))
		}
	}
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
	b.ReportMetric(float64(sz)/float64(len(flows)), "wire-bytes/flow")
}
