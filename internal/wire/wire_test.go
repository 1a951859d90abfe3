package wire

import (
	"errors"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/golang/snappy"
	"github.com/prometheus/prometheus/prompb"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
)

func testBatch() *Batch {
	return &Batch{
		Node: "node-a", Incarnation: "0123abcd", Seq: 7,
		Time: time.UnixMilli(1_700_000_000_123),
		Flows: []flow.Record{
			{Key: flow.Key{Src: netip.MustParseAddr("10.244.1.2"), Dst: netip.MustParseAddr("10.244.2.3"), Proto: 6, Port: 5432, PortIsDst: true}, Counts: flow.Counts{Bytes: 123456, Packets: 89}},
			{Key: flow.Key{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"), Proto: 17, Port: 53}, Counts: flow.Counts{Bytes: 1, Packets: 1}},
			{Key: flow.Key{Src: netip.MustParseAddr("10.244.1.2"), Dst: netip.MustParseAddr("8.8.8.8"), Proto: 1}, Counts: flow.Counts{Bytes: 84, Packets: 1}},
		},
		Metrics: []Metric{
			{Name: "kubezonnet_agent_uncounted_bytes_total", Labels: []Label{{"reason", "map_full"}}, Value: 42},
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
	if got, want := len(wr.Timeseries), 1+2*len(in.Flows)+len(in.Metrics); got != want {
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
		wantTS := in.Time.UnixMilli()
		if name := ts.Labels[0].Value; name == MetricBytes || name == MetricPackets {
			wantTS = 0 // the header's timestamp applies
		}
		if len(ts.Samples) != 1 || ts.Samples[0].Timestamp != wantTS {
			t.Errorf("series %v: samples %v", ts.Labels, ts.Samples)
		}
	}

	var d Decoder
	var out Batch
	if err := d.Decode(body, &out); err != nil {
		t.Fatal(err)
	}
	// The encoder orders flows for compression; the order is not part
	// of the contract, so compare them as sets.
	byKey := func(fs []flow.Record) map[flow.Key]flow.Counts {
		m := map[flow.Key]flow.Counts{}
		for _, f := range fs {
			m[f.Key] = f.Counts
		}
		return m
	}
	if len(out.Flows) != len(in.Flows) || !reflect.DeepEqual(byKey(in.Flows), byKey(out.Flows)) {
		t.Errorf("flows:\n got %+v\nwant %+v", out.Flows, in.Flows)
	}
	if !reflect.DeepEqual(in.Metrics, out.Metrics) {
		t.Errorf("metrics:\n got %+v\nwant %+v", out.Metrics, in.Metrics)
	}
	if out.Node != in.Node || out.Incarnation != in.Incarnation || out.Seq != in.Seq || !out.Time.Equal(in.Time) {
		t.Errorf("header: got %+v", out)
	}
}

func TestDecodeRejects(t *testing.T) {
	valid := func() []remotewrite.RawSeries { return nil }
	_ = valid
	encode := func(series ...[]string) []byte {
		var raw []byte
		var sb remotewrite.SeriesBuilder
		for _, s := range series {
			sb.Reset()
			for i := 0; i < len(s); i += 2 {
				sb.Label(s[i], s[i+1])
			}
			sb.Sample(1, 1000)
			raw = sb.AppendTo(raw)
		}
		return snappy.Encode(nil, raw)
	}
	hdr := []string{"__name__", MetricBatch, "incarnation", "x", "node", "n", "seq", "1"}
	bytesS := []string{"__name__", MetricBytes, "dport", "80", "dst", "10.0.0.2", "proto", "tcp", "src", "10.0.0.1"}
	pktsS := []string{"__name__", MetricPackets, "dport", "80", "dst", "10.0.0.2", "proto", "tcp", "src", "10.0.0.1"}
	pktsOther := []string{"__name__", MetricPackets, "dport", "81", "dst", "10.0.0.2", "proto", "tcp", "src", "10.0.0.1"}
	badIP := []string{"__name__", MetricBytes, "dst", "10.0.0.300", "proto", "tcp", "src", "10.0.0.1"}
	tests := []struct {
		name string
		body []byte
		want error
	}{
		{"not snappy", []byte("hello world, not snappy"), remotewrite.ErrMalformed},
		{"garbage protobuf", snappy.Encode(nil, []byte{0xff, 0xff, 0xff}), remotewrite.ErrMalformed},
		{"empty", snappy.Encode(nil, nil), remotewrite.ErrMalformed},
		{"no header", encode(bytesS, pktsS), remotewrite.ErrMalformed},
		{"bytes without packets", encode(hdr, bytesS), remotewrite.ErrMalformed},
		{"packets with other labels", encode(hdr, bytesS, pktsOther), remotewrite.ErrMalformed},
		{"bad address", encode(hdr, badIP, badIP), remotewrite.ErrMalformed},
		{"bad seq", encode([]string{"__name__", MetricBatch, "incarnation", "x", "node", "n", "seq", "zero"}), remotewrite.ErrMalformed},
		{"unknown series", encode(hdr, []string{"__name__", "up"}), remotewrite.ErrMalformed},
		{"valid", encode(hdr, bytesS, pktsS), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var d Decoder
			var b Batch
			err := d.Decode(tt.body, &b)
			if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
				t.Fatalf("Decode() = %v, want %v", err, tt.want)
			}
		})
	}
	t.Run("too many series", func(t *testing.T) {
		d := Decoder{Limits: Limits{MaxSeries: 2}}
		var b Batch
		if err := d.Decode(encode(hdr, bytesS, pktsS), &b); !errors.Is(err, ErrTooLarge) {
			t.Fatalf("Decode() = %v, want ErrTooLarge", err)
		}
	})
}
