package wire

import (
	"cmp"
	"slices"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// BenchmarkEncode is the encoder's share of the agent's
// BenchmarkEncodeFlush: 100,000 flows per op.
func BenchmarkEncode(b *testing.B) {
	batch := &Batch{Node: "ip-10-0-1-23.ec2.internal", Incarnation: "0123456789abcdef", Time: time.Now(), Flows: testutil.ClusterFlows(100_000)}
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
	batch := &Batch{Node: "ip-10-0-1-23.ec2.internal", Incarnation: "0123456789abcdef", Seq: 1, Time: time.Now(), Flows: testutil.ClusterFlows(100_000)}
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

// BenchmarkAppendFlow writes the series of 100,000 flows (no ordering, no
// compression): direct is the encoder's appendFlow, builder the same
// series through remotewrite.SeriesBuilder, the baseline that tells what
// the hand-written protobuf saves a flush.
func BenchmarkAppendFlow(b *testing.B) {
	flows := testutil.ClusterFlows(100_000)
	var sb remotewrite.SeriesBuilder
	for _, c := range []struct {
		name   string
		append func([]byte, *flow.Record) []byte
	}{
		{"direct", appendFlow},
		{"builder", func(buf []byte, f *flow.Record) []byte { return builderFlow(&sb, buf, f) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			var buf []byte
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				buf = buf[:0]
				for j := range flows {
					buf = c.append(buf, &flows[j])
				}
			}
		})
	}
}

// BenchmarkSortKeys orders the keys of 100,000 flows in the encoder's
// blocks: radix is the encoder's sortKeys, slices the same through
// slices.SortFunc, the baseline that tells what the radix sort saves a
// flush.
func BenchmarkSortKeys(b *testing.B) {
	flows := testutil.ClusterFlows(100_000)
	keys := make([]orderKey, len(flows))
	for i := range flows {
		keys[i] = orderKey{k: keyOf(&flows[i]), i: int32(i % sortBlock)}
	}
	for _, c := range []struct {
		name string
		sort func(a, tmp []orderKey) []orderKey
	}{
		{"radix", func(a, tmp []orderKey) []orderKey { _, tmp = sortKeys(a, tmp); return tmp }},
		{"slices", func(a, tmp []orderKey) []orderKey {
			slices.SortFunc(a, func(x, y orderKey) int { return cmp.Compare(x.k, y.k) })
			return tmp
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			work := make([]orderKey, len(keys))
			var tmp []orderKey
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				copy(work, keys)
				for start := 0; start < len(work); start += sortBlock {
					tmp = c.sort(work[start:min(start+sortBlock, len(work))], tmp)
				}
			}
		})
	}
}
