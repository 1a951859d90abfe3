package wire

import (
	"cmp"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/golang/snappy"
	"github.com/prometheus/prometheus/prompb"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// FuzzDecode feeds arbitrary request bodies to the decoder the server
// uses. It must never panic, must honour its limits, whatever it accepts
// must read the same through snappy and prompb (the reference decoder),
// series by series under the contract's mapping (agreeWithPrompb), and
// must survive an encode/decode round trip unchanged: the decoder never
// invents a batch that the contract cannot express.
func FuzzDecode(f *testing.F) {
	var e Encoder
	seed := &Batch{Node: "node-a", Incarnation: "1a2b", Seq: 7, Time: time.UnixMilli(1_700_000_000_000),
		Flows: []flow.Record{
			{Key: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), Proto: 6, Port: 443, PortIsDst: true},
				Counts: flow.Counts{Bytes: 1500, Packets: 3}},
			{Key: flow.Key{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("2001:db8::1"), Proto: 58},
				Counts: flow.Counts{Bytes: 64, Packets: 1}},
			{Key: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.3"), Proto: 6, Port: 8080, PortIsDst: true, OrigDst: netip.MustParseAddrPort("10.96.0.10:80")},
				Counts: flow.Counts{Bytes: 3000, Packets: 4}},
			{Key: flow.Key{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::3"), Proto: 17, Port: 5353, PortIsDst: true, OrigDst: netip.MustParseAddrPort("[fd00:96::10]:53")},
				Counts: flow.Counts{Bytes: 96, Packets: 1}},
		},
		Released: []Release{{netip.MustParseAddr("10.0.0.9"), time.UnixMilli(1_699_999_999_000)}, {netip.MustParseAddr("fd00::9"), time.UnixMilli(1_700_000_000_000)}},
		Metrics:  []Metric{{Name: "kubezonnet_agent_flows_total", Labels: []Label{{Name: "reason", Value: "x"}}, Value: 2}},
	}
	f.Add(slices.Clone(e.Encode(seed)))
	f.Add(slices.Clone(e.Encode(&Batch{Node: "n", Incarnation: "i", Seq: 1})))
	f.Add(slices.Clone(e.Encode(&Batch{Node: "n", Incarnation: "i", Seq: 2, Flows: []flow.Record{
		{Key: flow.Key{Src: netip.MustParseAddr("2001:db8:1234:5678:9abc:def0:1234:5678"), Dst: netip.MustParseAddr("::ffff:10.0.0.1"), Proto: 132, Port: 9}},
		{Key: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), Proto: 250}, Counts: flow.Counts{Bytes: 1 << 40, Packets: 1}},
	}})))
	// The encoder orders flows by address for compression, so a batch
	// whose IPv4 flow sorts after its IPv6 one comes back reordered (found
	// by CI's fuzzing: the round trip compared the order too).
	hdr := hdrSeries()
	f.Add(encodeSeries(hdr, flowS([]float64{1500, 3, 3})))
	// The encoder orders flows by address for compression, so a body whose
	// IPv4 flow comes before an IPv6 one that sorts lower comes back
	// reordered (found by CI's fuzzing, when the round trip compared the
	// order too).
	two := hdrSeries()
	two.samples = []remotewrite.Sample{{Value: 2, Timestamp: 1000}}
	f.Add(encodeSeries(two, flowS([]float64{1500, 3}, "src", "70.0.0.1", "dst", "70.0.0.2"),
		flowS([]float64{64, 1}, "src", "2001:db8::1234:5678", "dst", "::ffff:70.0.0.1")))
	f.Add(encodeSeries(hdr, flowS([]float64{1500, 3}, "proto", "icmp", "dport", "0")))
	f.Add(encodeSeries(hdr, flowS([]float64{1500, 3}, "orig_dst", "10.96.0.10:080")))
	f.Add(encodeSeries(hdr, flowS([]float64{1500, 3}, "orig_dst", "[::ffff:10.96.0.10]:80")))
	f.Add(encodeSeries(hdr, flowS([]float64{1500, 3}, "orig_dst", "[fe80::1%eth0]:80")))
	f.Add(encodeSeries(hdr, series{[]string{"__name__", "kubezonnet_flow_bytes", "dst", "10.0.0.2", "proto", "tcp", "sport", "80", "src", "10.0.0.1"}, hdr.samples}))
	f.Add(snappy.Encode(nil, []byte("\x0a\x02\x0a\x00")))
	f.Add([]byte{})
	f.Add([]byte("\xff\xff\xff\xff"))

	f.Fuzz(func(t *testing.T, body []byte) {
		d := Decoder{Limits: Limits{MaxDecodedBytes: 1 << 20, MaxSeries: 1000, MaxLabelLength: 256}}
		var b Batch
		if err := d.Decode(body, &b); err != nil {
			return
		}
		if b.Node == "" || b.Incarnation == "" || b.Seq == 0 {
			t.Fatalf("accepted a batch without identity: %+v", b)
		}
		if len(b.Flows) >= 1000 {
			t.Fatalf("%d flows exceed the series limit", len(b.Flows))
		}
		agreeWithPrompb(t, body, &b)
		var e Encoder
		var again Batch
		if err := (&Decoder{}).Decode(e.Encode(&b), &again); err != nil {
			t.Fatalf("re-encoded batch does not decode: %v", err)
		}
		if again.Node != b.Node || again.Incarnation != b.Incarnation || again.Seq != b.Seq ||
			again.Time.UnixMilli() != b.Time.UnixMilli() || !slices.Equal(sortedFlows(again.Flows), sortedFlows(b.Flows)) ||
			!slices.EqualFunc(again.Released, b.Released, func(x, y Release) bool { return x.Addr == y.Addr && x.Time.Equal(y.Time) }) {
			t.Fatalf("round trip changed the batch:\n%+v\n%+v", b, again)
		}
	})
}

// agreeWithPrompb decodes body, which the decoder accepted as b, with
// snappy and prompb.WriteRequest, and checks that both read the same
// request under the contract (package documentation): the first series is
// the header (node, incarnation, seq labels; one sample whose timestamp is
// the batch time), each kubezonnet_flow series is one flow in order (src,
// dst, orig_dst when present, proto, dport or sport; samples bytes then
// packets, no timestamps), and every other series is a self-metric in
// order (labels but __name__ and node; one sample's value).
func agreeWithPrompb(t *testing.T, body []byte, b *Batch) {
	t.Helper()
	raw, err := snappy.Decode(nil, body)
	if err != nil {
		t.Fatalf("decoder accepted a body snappy refuses: %v", err)
	}
	var wr prompb.WriteRequest
	if err := wr.Unmarshal(raw); err != nil {
		t.Fatalf("decoder accepted a request prompb refuses: %v\ndecoded: %+v", err, b)
	}
	if got, want := len(wr.Timeseries), 1+len(b.Flows)+len(b.Released)+len(b.Metrics); got != want {
		t.Fatalf("prompb reads %d series, the decoder 1 header + %d flows + %d released + %d metrics", got, len(b.Flows), len(b.Released), len(b.Metrics))
	}
	hdr := wr.Timeseries[0]
	if name := testutil.LabelValue(hdr.Labels, LabelName); name != MetricBatch {
		t.Fatalf("prompb's first series is %q, want %s", name, MetricBatch)
	}
	seq, err := strconv.ParseUint(testutil.LabelValue(hdr.Labels, LabelSeq), 10, 64)
	if err != nil || len(hdr.Samples) != 1 ||
		testutil.LabelValue(hdr.Labels, LabelNode) != b.Node ||
		testutil.LabelValue(hdr.Labels, LabelIncarnation) != b.Incarnation ||
		seq != b.Seq || hdr.Samples[0].Timestamp != b.Time.UnixMilli() {
		t.Fatalf("header: prompb reads %+v, the decoder node %q incarnation %q seq %d time %d",
			hdr, b.Node, b.Incarnation, b.Seq, b.Time.UnixMilli())
	}
	flows, released, metrics := b.Flows, b.Released, b.Metrics
	for i, ts := range wr.Timeseries[1:] {
		if testutil.LabelValue(ts.Labels, LabelName) == MetricReleased {
			if len(released) == 0 {
				t.Fatalf("series %d: prompb reads a released address %v beyond the decoder's", i+1, ts.Labels)
			}
			got := released[0]
			released = released[1:]
			if len(ts.Samples) != 1 || testutil.LabelValue(ts.Labels, LabelAddress) != got.Addr.String() || ts.Samples[0].Timestamp != got.Time.UnixMilli() {
				t.Fatalf("series %d: prompb reads %+v, the decoder the released address %s", i+1, ts, got)
			}
			continue
		}
		if testutil.LabelValue(ts.Labels, LabelName) != MetricFlow {
			if len(metrics) == 0 {
				t.Fatalf("series %d: prompb reads a self-metric %v beyond the decoder's", i+1, ts.Labels)
			}
			want := Metric{}
			for _, l := range ts.Labels {
				switch l.Name {
				case LabelName:
					want.Name = l.Value
				case LabelNode:
				default:
					want.Labels = append(want.Labels, Label{Name: l.Name, Value: l.Value})
				}
			}
			got := metrics[0]
			metrics = metrics[1:]
			if len(ts.Samples) != 1 || got.Name != want.Name || !slices.Equal(got.Labels, want.Labels) ||
				math.Float64bits(got.Value) != math.Float64bits(ts.Samples[0].Value) {
				t.Fatalf("series %d: prompb reads %+v, the decoder the self-metric %+v", i+1, ts, got)
			}
			continue
		}
		if len(flows) == 0 {
			t.Fatalf("series %d: prompb reads a flow %v beyond the decoder's", i+1, ts.Labels)
		}
		got := flows[0]
		flows = flows[1:]
		if want, ok := prompbFlow(ts); !ok || got != want {
			t.Fatalf("series %d: prompb reads %+v (contract: %+v, %v), the decoder %+v", i+1, ts, want, ok, got)
		}
	}
}

// prompbFlow maps a kubezonnet_flow series read by prompb to the flow the
// contract says it carries, with the standard library's parsers; ok is
// false when the series breaks the contract.
func prompbFlow(ts prompb.TimeSeries) (r flow.Record, ok bool) {
	if len(ts.Samples) != 2 {
		return r, false
	}
	seen := map[string]bool{}
	for _, l := range ts.Labels {
		if seen[l.Name] {
			return r, false
		}
		seen[l.Name] = true
		var err error
		switch l.Name {
		case LabelName:
		case LabelSrc:
			r.Src, err = netip.ParseAddr(l.Value)
		case LabelDst:
			r.Dst, err = netip.ParseAddr(l.Value)
		case LabelProto:
			r.Proto, err = flow.ParseProto(l.Value)
		case LabelOrigDst:
			r.OrigDst, err = netip.ParseAddrPort(l.Value)
			if err == nil && r.OrigDst.Addr().Zone() != "" {
				return r, false
			}
		case LabelDport, LabelSport:
			var n uint64
			n, err = strconv.ParseUint(l.Value, 10, 16)
			r.Port, r.PortIsDst = uint16(n), l.Name == LabelDport
		default:
			return r, false
		}
		if err != nil {
			return r, false
		}
	}
	if !seen[LabelSrc] || !seen[LabelDst] || !seen[LabelProto] || seen[LabelDport] && seen[LabelSport] {
		return r, false
	}
	for _, smp := range ts.Samples {
		if smp.Timestamp != 0 || !(smp.Value >= 0 && smp.Value < 1<<64) || smp.Value != math.Trunc(smp.Value) {
			return r, false
		}
	}
	r.Bytes, r.Packets = uint64(ts.Samples[0].Value), uint64(ts.Samples[1].Value)
	return r, true
}

// sortedFlows returns a sorted copy of fs: the encoder reorders flows
// (orderKey), and the order is not part of the contract.
func sortedFlows(fs []flow.Record) []flow.Record {
	return slices.SortedFunc(slices.Values(fs), func(x, y flow.Record) int {
		return cmp.Or(x.Src.Compare(y.Src), x.Dst.Compare(y.Dst), cmp.Compare(x.Proto, y.Proto),
			cmp.Compare(x.Port, y.Port), cmp.Compare(b2i(x.PortIsDst), b2i(y.PortIsDst)), x.OrigDst.Compare(y.OrigDst),
			cmp.Compare(x.Bytes, y.Bytes), cmp.Compare(x.Packets, y.Packets))
	})
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
