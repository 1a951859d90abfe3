package wire

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang/snappy"
	"github.com/prometheus/prometheus/prompb"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

func testBatch() *Batch {
	return &Batch{
		Node: "node-a", Incarnation: "0123abcd", Seq: 7,
		Time: time.UnixMilli(1_700_000_000_123),
		Flows: []flow.Record{
			{Key: flow.Key{Src: netip.MustParseAddr("10.244.1.2"), Dst: netip.MustParseAddr("10.244.2.3"), Proto: 6, Port: 5432, PortIsDst: true}, Counts: flow.Counts{Bytes: 123456, Packets: 89}},
			{Key: flow.Key{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"), Proto: 17, Port: 53}, Counts: flow.Counts{Bytes: 1, Packets: 1}},
			{Key: flow.Key{Src: netip.MustParseAddr("10.244.1.2"), Dst: netip.MustParseAddr("8.8.8.8"), Proto: 1}, Counts: flow.Counts{Bytes: 84, Packets: 1}},
			// Through Services: the virtual IP and port the client addressed.
			{Key: flow.Key{Src: netip.MustParseAddr("10.244.1.2"), Dst: netip.MustParseAddr("10.244.3.4"), Proto: 6, Port: 8080, PortIsDst: true, OrigDst: netip.MustParseAddrPort("10.96.0.10:80")}, Counts: flow.Counts{Bytes: 9000, Packets: 7}},
			{Key: flow.Key{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::3"), Proto: 17, Port: 5353, PortIsDst: true, OrigDst: netip.MustParseAddrPort("[fd00:96::a]:53")}, Counts: flow.Counts{Bytes: 120, Packets: 2}},
		},
		Released: []Release{
			{netip.MustParseAddr("10.244.1.9"), time.UnixMilli(1_700_000_000_100)},
			{netip.MustParseAddr("fd00::9"), time.UnixMilli(1_700_000_000_123)},
		},
		Metrics: []Metric{
			{Name: "kubezonnet_agent_dropped_bytes_total", Labels: []Label{{"reason", "map_full"}}, Value: 42},
			{Name: "kubezonnet_agent_flows_total", Value: 3},
		},
	}
}

// TestRoundTrip encodes a batch, checks the body with prompb (the reference
// decoder) for the remote-write rules, and decodes it back.
func TestRoundTrip(t *testing.T) {
	in := testBatch()
	var e Encoder
	body := e.Encode(in)

	raw, err := snappy.Decode(nil, body)
	if err != nil {
		t.Fatal(err)
	}
	var wr prompb.WriteRequest
	if err := wr.Unmarshal(raw); err != nil {
		t.Fatalf("prompb cannot decode the request: %v", err)
	}
	if got, want := len(wr.Timeseries), 1+len(in.Flows)+len(in.Released)+len(in.Metrics); got != want {
		t.Fatalf("series = %d, want %d", got, want)
	}
	for _, ts := range wr.Timeseries {
		if ts.Labels[0].Name != "__name__" {
			t.Errorf("series %v: __name__ not first", ts.Labels)
		}
		for i := 1; i < len(ts.Labels); i++ {
			if ts.Labels[i-1].Name >= ts.Labels[i].Name {
				t.Errorf("series %v: labels not sorted", ts.Labels)
			}
		}
		wantTS, wantN := in.Time.UnixMilli(), 1
		switch ts.Labels[0].Value {
		case MetricFlow:
			wantTS, wantN = 0, 2 // bytes, packets; the header's timestamp applies
		case MetricReleased:
			wantTS = ts.Samples[0].Timestamp // checked below
		}
		if len(ts.Samples) != wantN {
			t.Errorf("series %v: samples %v", ts.Labels, ts.Samples)
		}
		for _, s := range ts.Samples {
			if s.Timestamp != wantTS {
				t.Errorf("series %v: samples %v", ts.Labels, ts.Samples)
			}
		}
	}
	// Each flow's samples are its bytes then its packets.
	for _, f := range in.Flows {
		found := false
		for _, ts := range wr.Timeseries {
			if ts.Labels[0].Value == MetricFlow && testutil.LabelValue(ts.Labels, "src") == f.Src.String() && testutil.LabelValue(ts.Labels, "dst") == f.Dst.String() {
				found = true
				// orig_dst only where the flow has one.
				wantOrig := ""
				if f.OrigDst.IsValid() {
					wantOrig = f.OrigDst.String()
				}
				if got := testutil.LabelValue(ts.Labels, LabelOrigDst); got != wantOrig {
					t.Errorf("flow %v: orig_dst %q, want %q", f, got, wantOrig)
				}
				if ts.Samples[0].Value != float64(f.Bytes) || ts.Samples[1].Value != float64(f.Packets) {
					t.Errorf("flow %v: samples %v", f, ts.Samples)
				}
			}
		}
		if !found {
			t.Errorf("flow %v not encoded", f)
		}
	}

	var d Decoder
	var out Batch
	if err := d.Decode(body, &out); err != nil {
		t.Fatal(err)
	}
	// The encoder orders flows for compression; the order is not part
	// of the contract (sortedFlows).
	if !slices.Equal(sortedFlows(in.Flows), sortedFlows(out.Flows)) {
		t.Errorf("flows:\n got %+v\nwant %+v", out.Flows, in.Flows)
	}
	if !reflect.DeepEqual(in.Metrics, out.Metrics) {
		t.Errorf("metrics:\n got %+v\nwant %+v", out.Metrics, in.Metrics)
	}
	if !slices.EqualFunc(in.Released, out.Released, func(a, b Release) bool { return a.Addr == b.Addr && a.Time.Equal(b.Time) }) {
		t.Errorf("released: got %v, want %v", out.Released, in.Released)
	}
	// Read by the reference decoder too: one series per address.
	var released []string
	for _, ts := range wr.Timeseries {
		if ts.Labels[0].Value == MetricReleased {
			if len(ts.Labels) != 2 || ts.Samples[0].Value != 1 {
				t.Errorf("released series %v %v", ts.Labels, ts.Samples)
			}
			released = append(released, fmt.Sprintf("%s@%d", testutil.LabelValue(ts.Labels, LabelAddress), ts.Samples[0].Timestamp))
		}
	}
	if want := []string{"10.244.1.9@1700000000100", "fd00::9@1700000000123"}; !slices.Equal(released, want) {
		t.Errorf("released series name %v, want %v", released, want)
	}
	if out.Node != in.Node || out.Incarnation != in.Incarnation || out.Seq != in.Seq || !out.Time.Equal(in.Time) {
		t.Errorf("header: got %+v", out)
	}
}

// series is a hand-built series for TestDecodeRejects: label name and value
// pairs, and its samples.
type series struct {
	labels  []string
	samples []remotewrite.Sample
}

func hdrSeries() series {
	return series{[]string{"__name__", MetricBatch, "incarnation", "x", "node", "n", "seq", "1"}, []remotewrite.Sample{{Value: 1, Timestamp: 1000}}}
}

// flowS is a valid flow series with labels changed by kv (name, value;
// an empty value removes the label) and the given sample values.
func flowS(values []float64, kv ...string) series {
	labels := []string{"__name__", MetricFlow, "dport", "80", "dst", "10.0.0.2", "proto", "tcp", "src", "10.0.0.1"}
	for i := 0; i < len(kv); i += 2 {
		found := false
		for j := 0; j < len(labels); j += 2 {
			if labels[j] == kv[i] {
				labels[j+1], found = kv[i+1], true
			}
		}
		if !found {
			labels = append(labels, kv[i], kv[i+1])
		}
	}
	var pairs [][2]string
	for j := 2; j < len(labels); j += 2 {
		if labels[j+1] != "" {
			pairs = append(pairs, [2]string{labels[j], labels[j+1]})
		}
	}
	slices.SortFunc(pairs, func(a, b [2]string) int { return strings.Compare(a[0], b[0]) })
	out := labels[:2]
	for _, p := range pairs {
		out = append(out, p[0], p[1])
	}
	s := series{labels: out}
	for _, v := range values {
		s.samples = append(s.samples, remotewrite.Sample{Value: v})
	}
	return s
}

func encodeSeries(ss ...series) []byte {
	var raw []byte
	var sb remotewrite.SeriesBuilder
	for _, s := range ss {
		sb.Reset()
		for i := 0; i < len(s.labels); i += 2 {
			sb.Label(s.labels[i], s.labels[i+1])
		}
		for _, smp := range s.samples {
			sb.Sample(smp.Value, smp.Timestamp)
		}
		raw = sb.AppendTo(raw)
	}
	return snappy.Encode(nil, raw)
}

func TestDecodeRejects(t *testing.T) {
	hdr := hdrSeries()
	ok := []float64{1500, 3}
	withTS := flowS(ok)
	withTS.samples[1].Timestamp = 1000
	tests := []struct {
		name string
		body []byte
		want error
		msg  string // in the error
	}{
		{"not snappy", []byte("hello world, not snappy"), remotewrite.ErrMalformed, "snappy"},
		{"garbage protobuf", snappy.Encode(nil, []byte{0xff, 0xff, 0xff}), remotewrite.ErrMalformed, ""},
		{"truncated series", snappy.Encode(nil, []byte{0x0a, 0x05, 0x0a}), remotewrite.ErrMalformed, ""},
		{"empty", snappy.Encode(nil, nil), remotewrite.ErrMalformed, "empty request"},
		{"no header", encodeSeries(flowS(ok)), remotewrite.ErrMalformed, "first series"},
		{"bad seq", encodeSeries(series{[]string{"__name__", MetricBatch, "incarnation", "x", "node", "n", "seq", "zero"}, hdr.samples}), remotewrite.ErrMalformed, "seq"},
		{"header with 2 samples", encodeSeries(series{hdr.labels, []remotewrite.Sample{{Value: 1, Timestamp: 1000}, {Value: 1, Timestamp: 1001}}}), remotewrite.ErrMalformed, "want 1"},
		{"unknown series", encodeSeries(hdr, series{[]string{"__name__", "up"}, hdr.samples}), remotewrite.ErrMalformed, "unexpected series"},
		{"flow with 0 samples", encodeSeries(hdr, flowS(nil)), remotewrite.ErrMalformed, "0 samples, want 2"},
		{"flow with 1 sample", encodeSeries(hdr, flowS([]float64{1500})), remotewrite.ErrMalformed, "1 samples, want 2"},
		{"flow with 3 samples", encodeSeries(hdr, flowS([]float64{1500, 3, 3})), remotewrite.ErrMalformed, "3 samples, want 2"},
		{"former bytes series", encodeSeries(hdr, series{append([]string{"__name__", "kubezonnet_flow_bytes"}, flowS(nil).labels[2:]...), hdr.samples}), remotewrite.ErrMalformed, "unexpected series"},
		{"negative bytes", encodeSeries(hdr, flowS([]float64{-1, 3})), remotewrite.ErrMalformed, "not a count"},
		{"NaN packets", encodeSeries(hdr, flowS([]float64{1500, math.NaN()})), remotewrite.ErrMalformed, "not a count"},
		{"stale marker", encodeSeries(hdr, flowS([]float64{remotewrite.StaleNaN, 3})), remotewrite.ErrMalformed, "not a count"},
		{"infinite bytes", encodeSeries(hdr, flowS([]float64{math.Inf(1), 3})), remotewrite.ErrMalformed, "not a count"},
		{"2^64 bytes", encodeSeries(hdr, flowS([]float64{1 << 64, 3})), remotewrite.ErrMalformed, "not a count"},
		{"fractional packets", encodeSeries(hdr, flowS([]float64{1500, 2.5})), remotewrite.ErrMalformed, "not an integer"},
		{"sample timestamp", encodeSeries(hdr, withTS), remotewrite.ErrMalformed, "timestamp"},
		{"bad src", encodeSeries(hdr, flowS(ok, "src", "10.0.0.300")), remotewrite.ErrMalformed, "src: invalid address"},
		{"bad dst", encodeSeries(hdr, flowS(ok, "dst", "10.0.0.01")), remotewrite.ErrMalformed, "dst: invalid address"},
		{"zone", encodeSeries(hdr, flowS(ok, "dst", "fe80::1%eth0")), remotewrite.ErrMalformed, "dst: invalid address"},
		{"no src", encodeSeries(hdr, flowS(ok, "src", "")), remotewrite.ErrMalformed, "without src"},
		{"no proto", encodeSeries(hdr, flowS(ok, "proto", "")), remotewrite.ErrMalformed, "without src"},
		{"bad proto", encodeSeries(hdr, flowS(ok, "proto", "256")), remotewrite.ErrMalformed, "invalid proto"},
		{"bad port", encodeSeries(hdr, flowS(ok, "dport", "65536")), remotewrite.ErrMalformed, "invalid port"},
		{"empty port", encodeSeries(hdr, flowS(ok, "dport", "x", "dport", "")), remotewrite.ErrMalformed, "without dport or sport"},
		{"both ports", encodeSeries(hdr, flowS(ok, "sport", "80")), remotewrite.ErrMalformed, "both dport and sport"},
		{"tcp without port", encodeSeries(hdr, flowS(ok, "dport", "")), remotewrite.ErrMalformed, "without dport or sport"},
		{"icmp with port 0", encodeSeries(hdr, flowS(ok, "proto", "icmp", "dport", "0")), remotewrite.ErrMalformed, "port 0"},
		{"extra label", encodeSeries(hdr, flowS(ok, "zone", "a")), remotewrite.ErrMalformed, "unexpected label"},
		{"orig_dst without port", encodeSeries(hdr, flowS(ok, "orig_dst", "10.96.0.10")), remotewrite.ErrMalformed, "orig_dst: invalid address and port"},
		{"orig_dst port too large", encodeSeries(hdr, flowS(ok, "orig_dst", "10.96.0.10:65536")), remotewrite.ErrMalformed, "orig_dst: invalid address and port"},
		{"orig_dst bad address", encodeSeries(hdr, flowS(ok, "orig_dst", "10.96.0.300:80")), remotewrite.ErrMalformed, "orig_dst: invalid address and port"},
		{"orig_dst ipv6 without brackets", encodeSeries(hdr, flowS(ok, "orig_dst", "fd00:96::10:80")), remotewrite.ErrMalformed, "orig_dst: invalid address and port"},
		{"orig_dst ipv4 in brackets", encodeSeries(hdr, flowS(ok, "orig_dst", "[10.96.0.10]:80")), remotewrite.ErrMalformed, "orig_dst: invalid address and port"},
		{"orig_dst zone", encodeSeries(hdr, flowS(ok, "orig_dst", "[fe80::1%eth0]:80")), remotewrite.ErrMalformed, "orig_dst: invalid address and port"},
		{"orig_dst empty", encodeSeries(hdr, series{[]string{"__name__", MetricFlow, "dport", "80", "dst", "10.0.0.2", "orig_dst", "", "proto", "tcp", "src", "10.0.0.1"}, flowS(ok).samples}), remotewrite.ErrMalformed, "orig_dst: invalid address and port"},
		{"orig_dst not sorted", encodeSeries(hdr, series{[]string{"__name__", MetricFlow, "dport", "80", "dst", "10.0.0.2", "proto", "tcp", "orig_dst", "10.96.0.10:80", "src", "10.0.0.1"}, flowS(ok).samples}), remotewrite.ErrMalformed, "not sorted"},
		{"orig_dst repeated", encodeSeries(hdr, series{[]string{"__name__", MetricFlow, "dport", "80", "dst", "10.0.0.2", "orig_dst", "10.96.0.10:80", "orig_dst", "10.96.0.11:80", "proto", "tcp", "src", "10.0.0.1"}, flowS(ok).samples}), remotewrite.ErrMalformed, "repeated"},
		{"unsorted labels", encodeSeries(hdr, series{[]string{"__name__", MetricFlow, "src", "10.0.0.1", "dst", "10.0.0.2", "proto", "tcp", "dport", "80"}, flowS(ok).samples}), remotewrite.ErrMalformed, "not sorted"},
		{"repeated label", encodeSeries(hdr, series{[]string{"__name__", MetricFlow, "dport", "80", "dst", "10.0.0.2", "dst", "10.0.0.3", "proto", "tcp", "src", "10.0.0.1"}, flowS(ok).samples}), remotewrite.ErrMalformed, "repeated"},
		{"__name__ not first", encodeSeries(hdr, series{[]string{"dport", "80", "__name__", MetricFlow, "dst", "10.0.0.2", "proto", "tcp", "src", "10.0.0.1"}, flowS(ok).samples}), remotewrite.ErrMalformed, "first label"},
		{"released before the header", encodeSeries(series{[]string{"__name__", MetricReleased, "address", "10.0.0.1"}, hdr.samples}, hdr), remotewrite.ErrMalformed, "first series"},
		{"released bad address", encodeSeries(hdr, series{[]string{"__name__", MetricReleased, "address", "10.0.0.300"}, hdr.samples}), remotewrite.ErrMalformed, "address: invalid address"},
		{"released without address", encodeSeries(hdr, series{[]string{"__name__", MetricReleased}, hdr.samples}), remotewrite.ErrMalformed, "address: invalid address"},
		{"released with a zone", encodeSeries(hdr, series{[]string{"__name__", MetricReleased, "address", "fe80::1%eth0"}, hdr.samples}), remotewrite.ErrMalformed, "address: invalid address"},
		{"released extra label", encodeSeries(hdr, series{[]string{"__name__", MetricReleased, "address", "10.0.0.1", "node", "n"}, hdr.samples}), remotewrite.ErrMalformed, "unexpected label"},
		{"released 2 samples", encodeSeries(hdr, series{[]string{"__name__", MetricReleased, "address", "10.0.0.1"}, []remotewrite.Sample{{Value: 1, Timestamp: 1000}, {Value: 1, Timestamp: 1000}}}), remotewrite.ErrMalformed, "want 1"},
		{"released after the batch", encodeSeries(hdr, series{[]string{"__name__", MetricReleased, "address", "10.0.0.1"}, []remotewrite.Sample{{Value: 1, Timestamp: hdr.samples[0].Timestamp + 1}}}), remotewrite.ErrMalformed, "not within"},
		{"released at 0", encodeSeries(hdr, series{[]string{"__name__", MetricReleased, "address", "10.0.0.1"}, []remotewrite.Sample{{Value: 1}}}), remotewrite.ErrMalformed, "not within"},
		{"valid released", encodeSeries(hdr, flowS(ok), series{[]string{"__name__", MetricReleased, "address", "10.0.0.1"}, hdr.samples}), nil, ""},
		{"valid", encodeSeries(hdr, flowS(ok)), nil, ""},
		{"valid icmp", encodeSeries(hdr, flowS(ok, "proto", "icmp", "dport", "")), nil, ""},
		{"valid other proto with port", encodeSeries(hdr, flowS(ok, "proto", "33", "dport", "", "sport", "5004")), nil, ""},
		{"valid v6", encodeSeries(hdr, flowS(ok, "src", "fd00::1", "dst", "2001:db8::1")), nil, ""},
		{"valid orig_dst", encodeSeries(hdr, flowS(ok, "orig_dst", "10.96.0.10:80")), nil, ""},
		{"valid orig_dst v6", encodeSeries(hdr, flowS(ok, "src", "fd00::1", "dst", "fd00::2", "orig_dst", "[fd00:96::10]:443")), nil, ""},
		{"valid orig_dst port 0", encodeSeries(hdr, flowS(ok, "proto", "icmp", "dport", "", "orig_dst", "10.96.0.10:0")), nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var d Decoder
			var b Batch
			err := d.Decode(tt.body, &b)
			if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.msg)) {
				t.Fatalf("Decode() = %v, want %v containing %q", err, tt.want, tt.msg)
			}
		})
	}
	t.Run("too many series", func(t *testing.T) {
		d := Decoder{Limits: Limits{MaxSeries: 2}}
		var b Batch
		if err := d.Decode(encodeSeries(hdr, flowS(ok), flowS(ok)), &b); !errors.Is(err, ErrTooLarge) {
			t.Fatalf("Decode() = %v, want ErrTooLarge", err)
		}
	})
	t.Run("label too long", func(t *testing.T) {
		d := Decoder{Limits: Limits{MaxLabelLength: 8}}
		var b Batch
		if err := d.Decode(encodeSeries(hdr, flowS(ok, "src", "10.0.0.100")), &b); !errors.Is(err, ErrTooLarge) {
			t.Fatalf("Decode() = %v, want ErrTooLarge", err)
		}
	})
}

// TestDecodeFlowValues: the samples are the bytes then the packets,
// exactly, and orig_dst is the flow's original destination.
func TestDecodeFlowValues(t *testing.T) {
	big := float64(1 << 63) // beyond int64, still a count
	key := flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), Proto: 6, Port: 80, PortIsDst: true}
	withOrig := func(k flow.Key, p string) flow.Key {
		k.OrigDst = netip.MustParseAddrPort(p)
		return k
	}
	v6 := flow.Key{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"), Proto: 17, Port: 5353, PortIsDst: true}
	tests := []struct {
		name   string
		series series
		want   flow.Record
	}{
		{"counts", flowS([]float64{big, 7}), flow.Record{Key: key, Counts: flow.Counts{Bytes: 1 << 63, Packets: 7}}},
		{"orig_dst", flowS([]float64{1500, 3}, "orig_dst", "10.96.0.10:80"),
			flow.Record{Key: withOrig(key, "10.96.0.10:80"), Counts: flow.Counts{Bytes: 1500, Packets: 3}}},
		{"orig_dst ipv6", flowS([]float64{100, 1}, "src", "fd00::1", "dst", "fd00::2", "proto", "udp", "dport", "5353", "orig_dst", "[fd00:96::10]:53"),
			flow.Record{Key: withOrig(v6, "[fd00:96::10]:53"), Counts: flow.Counts{Bytes: 100, Packets: 1}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var d Decoder
			var b Batch
			if err := d.Decode(encodeSeries(hdrSeries(), tt.series), &b); err != nil {
				t.Fatal(err)
			}
			if len(b.Flows) != 1 || b.Flows[0] != tt.want {
				t.Fatalf("flows = %+v, want %+v", b.Flows, tt.want)
			}
		})
	}
}

// TestDecodeNonCanonical: what protobuf allows beyond the encoder's form
// (unknown fields, a label's value before its name, a two-byte length)
// decodes to the same flow.
func TestDecodeNonCanonical(t *testing.T) {
	label := func(name, value string) []byte {
		// value first, then name, then an unknown varint field
		var l []byte
		l = protowire.AppendTag(l, 2, protowire.BytesType)
		l = protowire.AppendString(l, value)
		l = protowire.AppendTag(l, 1, protowire.BytesType)
		l = protowire.AppendString(l, name)
		l = protowire.AppendTag(l, 9, protowire.VarintType)
		return protowire.AppendVarint(l, 1)
	}
	sample := func(v float64) []byte {
		var s []byte
		s = protowire.AppendTag(s, 1, protowire.Fixed64Type)
		s = protowire.AppendFixed64(s, math.Float64bits(v))
		s = protowire.AppendTag(s, 2, protowire.VarintType)
		return protowire.AppendVarint(s, 0) // an explicit zero timestamp
	}
	var ts []byte
	for _, l := range [][2]string{{"__name__", MetricFlow}, {"dst", "fd00::2"}, {"proto", "udp"}, {"sport", "53"}, {"src", "fd00:0:0:0:0:0:0:1"}} {
		ts = protowire.AppendTag(ts, 1, protowire.BytesType)
		ts = protowire.AppendBytes(ts, label(l[0], l[1]))
	}
	ts = protowire.AppendTag(ts, 2, protowire.BytesType)
	ts = protowire.AppendBytes(ts, sample(64))
	ts = protowire.AppendTag(ts, 15, protowire.BytesType) // an unknown field: skipped
	ts = protowire.AppendBytes(ts, bytes.Repeat([]byte{0x0d, 0, 0, 0, 0}, 30))
	ts = protowire.AppendTag(ts, 2, protowire.BytesType)
	ts = protowire.AppendBytes(ts, sample(1))
	raw, _ := snappy.Decode(nil, encodeSeries(hdrSeries()))
	raw = protowire.AppendTag(raw, 1, protowire.BytesType)
	raw = protowire.AppendBytes(raw, ts)
	var d Decoder
	var b Batch
	if err := d.DecodeRaw(raw, &b); err != nil {
		t.Fatal(err)
	}
	// Exemplars and histograms are not skipped but refused, in a flow
	// series and in the header.
	hdrReq, _ := snappy.Decode(nil, encodeSeries(hdrSeries()))
	_, _, n := protowire.ConsumeTag(hdrReq)
	hdr, _ := protowire.ConsumeBytes(hdrReq[n:])
	asField := func(series []byte) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), series)
	}
	for _, num := range []protowire.Number{3, 4} {
		extra := protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), nil)
		with := func(series []byte) []byte { return append(slices.Clone(series), extra...) }
		for name, req := range map[string][]byte{
			"flow series": append(asField(hdr), asField(with(ts))...),
			"header":      append(asField(with(hdr)), asField(ts)...),
		} {
			if err := d.DecodeRaw(req, &Batch{}); err == nil || !errors.Is(err, remotewrite.ErrMalformed) {
				t.Errorf("%s with timeseries field %d: error %v, want a malformed request", name, num, err)
			}
		}
	}
	want := flow.Record{
		Key:    flow.Key{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"), Proto: 17, Port: 53},
		Counts: flow.Counts{Bytes: 64, Packets: 1},
	}
	if len(b.Flows) != 1 || b.Flows[0] != want {
		t.Fatalf("flows = %+v, want %+v", b.Flows, want)
	}
}

// TestDecodeAllocs: once warm, decoding allocates nothing per flow.
func TestDecodeAllocs(t *testing.T) {
	in := testBatch()
	for i := range 1000 {
		in.Flows = append(in.Flows, flow.Record{
			Key:    flow.Key{Src: netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), Dst: netip.MustParseAddr("fd00::2"), Proto: 6, Port: 443, PortIsDst: true},
			Counts: flow.Counts{Bytes: uint64(i), Packets: 1},
		})
	}
	in.Metrics = nil
	var e Encoder
	body := e.Encode(in)
	var d Decoder
	var b Batch
	allocs := testing.AllocsPerRun(10, func() {
		if err := d.Decode(body, &b); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 3 { // node, incarnation, the header's closure
		t.Errorf("%v allocations per decode of %d flows", allocs, len(in.Flows))
	}
}

// TestEncodeMatchesBuilder: the encoder's hand-written flow series are
// what remotewrite.SeriesBuilder writes, the long IPv6 ones included.
func TestEncodeMatchesBuilder(t *testing.T) {
	for _, f := range []flow.Record{
		testBatch().Flows[0],
		{Key: flow.Key{Src: netip.MustParseAddr("2001:db8:1234:5678:9abc:def0:1234:5678"), Dst: netip.MustParseAddr("::ffff:10.0.0.1"), Proto: 132, Port: 65535}, Counts: flow.Counts{Bytes: 1 << 40, Packets: 1 << 20}},
		{Key: flow.Key{Src: netip.MustParseAddr("0.0.0.0"), Dst: netip.MustParseAddr("255.255.255.255"), Proto: 250, Port: 9, PortIsDst: true}},
		{Key: flow.Key{Src: netip.MustParseAddr("1.20.100.9"), Dst: netip.MustParseAddr("199.9.10.99"), Proto: 58}},
		{Key: flow.Key{Src: netip.MustParseAddr("10.244.1.2"), Dst: netip.MustParseAddr("10.244.3.4"), Proto: 6, Port: 8080, PortIsDst: true, OrigDst: netip.MustParseAddrPort("10.96.0.10:80")}, Counts: flow.Counts{Bytes: 1, Packets: 1}},
		{Key: flow.Key{Src: netip.MustParseAddr("2001:db8:1234:5678:9abc:def0:1234:5678"), Dst: netip.MustParseAddr("2001:db8:1234:5678:9abc:def0:1234:5679"), Proto: 17, Port: 65535, OrigDst: netip.MustParseAddrPort("[2001:db8:1234:5678:9abc:def0:1234:567a]:65535")}},
		{Key: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("::ffff:10.0.0.2"), Proto: 1, OrigDst: netip.MustParseAddrPort("[::ffff:10.96.0.1]:0")}},
	} {
		var sb remotewrite.SeriesBuilder
		if got, want := appendFlow(nil, &f), builderFlow(&sb, nil, &f); !bytes.Equal(got, want) {
			t.Errorf("flow %+v:\n got %x\nwant %x", f, got, want)
		}
	}
}

// builderFlow appends f's series as the contract describes it, built
// with remotewrite.SeriesBuilder: the reference appendFlow is held to,
// and its benchmark's baseline.
func builderFlow(sb *remotewrite.SeriesBuilder, b []byte, f *flow.Record) []byte {
	sb.Reset()
	sb.Label(LabelName, MetricFlow)
	port := strconv.Itoa(int(f.Port))
	hasPort := f.Port != 0 || f.Proto == 6 || f.Proto == 17 || f.Proto == 132
	if hasPort && f.PortIsDst {
		sb.Label(LabelDport, port)
	}
	sb.Label(LabelDst, f.Dst.String())
	if f.OrigDst.IsValid() {
		sb.Label(LabelOrigDst, f.OrigDst.String())
	}
	sb.Label(LabelProto, flow.ProtoName(f.Proto))
	if hasPort && !f.PortIsDst {
		sb.Label(LabelSport, port)
	}
	sb.Label(LabelSrc, f.Src.String())
	sb.Sample(float64(f.Bytes), 0)
	sb.Sample(float64(f.Packets), 0)
	return sb.AppendTo(b)
}

// TestSortKeys: the radix sort orders keys as a comparison sort does,
// bytes shared by all keys (skipped passes) included.
func TestSortKeys(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 255, 256, 10_000} {
		var order []orderKey
		for i := range n {
			k := r.Uint64()&0x0000_ff00_ffff_00ff | 0x0a00_0000_0000_0000
			order = append(order, orderKey{k: k, i: int32(i)})
		}
		want := slices.Clone(order)
		slices.SortStableFunc(want, func(x, y orderKey) int { return cmp.Compare(x.k, y.k) })
		if got, _ := sortKeys(order, nil); !slices.Equal(got, want) {
			t.Errorf("n=%d: radix order differs from a stable sort", n)
		}
	}
}
