package wire

import (
	"net/netip"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
)

// benchFlows makes n flows shaped like agent/bench_test.go's clusterFlows:
// 100 local pods talking to 2,000 remote pods on a few service ports, a
// quarter of them IPv6.
func benchFlows(n int) []flow.Record {
	out := make([]flow.Record, 0, n)
	ports := []uint16{80, 443, 5432, 6379, 8080, 9090, 53}
	for i := range n {
		src := netip.AddrFrom4([4]byte{10, 244, 1, byte(2 + i%100)})
		dst := netip.AddrFrom4([4]byte{10, 244, byte(2 + (i/100)%20), byte(2 + (i/2000)%250)})
		if i%4 == 3 {
			src = netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x10, 0x2, 0x44, 0, 1, 15: byte(2 + i%100)})
			dst = netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x10, 0x2, 0x44, 0, byte(2 + (i/100)%20), 14: byte(i / 2000), 15: byte(2 + (i/2000)%250)})
		}
		out = append(out, flow.Record{
			Key:    flow.Key{Src: src, Dst: dst, Proto: 6, Port: ports[i%len(ports)], PortIsDst: i%3 != 0},
			Counts: flow.Counts{Bytes: uint64(1000 + i*37%900_000), Packets: uint64(1 + i*7%700)},
		})
	}
	return out
}

// BenchmarkEncode is the encoder's share of the agent's
// BenchmarkEncodeFlush: 100,000 flows per op.
func BenchmarkEncode(b *testing.B) {
	batch := &Batch{Node: "ip-10-0-1-23.ec2.internal", Incarnation: "0123456789abcdef", Time: time.Now(), Flows: benchFlows(100_000)}
	var e Encoder
	var size int
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		batch.Seq = uint64(i + 1)
		size = len(e.Encode(batch))
	}
	b.ReportMetric(float64(size)/float64(len(batch.Flows)), "wire-bytes/flow")
}

// BenchmarkDecode decodes the body of BenchmarkEncode: 100,000 flows per op.
func BenchmarkDecode(b *testing.B) {
	batch := &Batch{Node: "ip-10-0-1-23.ec2.internal", Incarnation: "0123456789abcdef", Seq: 1, Time: time.Now(), Flows: benchFlows(100_000)}
	var e Encoder
	body := e.Encode(batch)
	var d Decoder
	var out Batch
	if err := d.Decode(body, &out); err != nil { // warm the buffers
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := d.Decode(body, &out); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(len(batch.Flows)), "ns/flow")
}
