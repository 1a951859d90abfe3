package wire

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"time"
	"unsafe"

	"github.com/golang/snappy"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
)

// Limits bound what one request may carry. Zero means the default.
type Limits struct {
	// MaxDecodedBytes bounds the uncompressed body (default 64 MiB).
	MaxDecodedBytes int
	// MaxSeries bounds the series in one request (default 1,000,000).
	MaxSeries int
	// MaxLabelLength bounds each label name and value (default 1,024).
	MaxLabelLength int
}

func (l Limits) withDefaults() Limits {
	if l.MaxDecodedBytes == 0 {
		l.MaxDecodedBytes = 64 << 20
	}
	if l.MaxSeries == 0 {
		l.MaxSeries = 1_000_000
	}
	if l.MaxLabelLength == 0 {
		l.MaxLabelLength = 1024
	}
	return l
}

// ErrTooLarge wraps limit violations (servers answer 413).
var ErrTooLarge = errors.New("request exceeds a limit")

// Decoder parses request bodies into batches. Reuse one per goroutine: once
// warm, decoding allocates only the batch's node and incarnation strings and
// the self-metrics.
type Decoder struct {
	Limits Limits
	raw    []byte
	rs     remotewrite.RawSeries
	prev   []remotewrite.RawLabel
}

// Decode decompresses and parses body into b, reusing b.Flows.
func (d *Decoder) Decode(body []byte, b *Batch) error {
	lim := d.Limits.withDefaults()
	n, err := snappy.DecodedLen(body)
	if err != nil {
		return fmt.Errorf("%w: snappy: %v", remotewrite.ErrMalformed, err)
	}
	if n > lim.MaxDecodedBytes {
		return fmt.Errorf("%w: decoded body of %d bytes exceeds %d", ErrTooLarge, n, lim.MaxDecodedBytes)
	}
	if cap(d.raw) < n {
		d.raw = make([]byte, n)
	}
	raw, err := snappy.Decode(d.raw[:cap(d.raw)], body)
	if err != nil {
		return fmt.Errorf("%w: snappy: %v", remotewrite.ErrMalformed, err)
	}
	return d.DecodeRaw(raw, b)
}

// DecodeRaw parses an uncompressed WriteRequest into b.
func (d *Decoder) DecodeRaw(raw []byte, b *Batch) error {
	lim := d.Limits.withDefaults()
	*b = Batch{Flows: b.Flows[:0], Metrics: b.Metrics[:0]}
	series := 0
	header := false
	wantPackets := false
	var cur flow.Record
	err := remotewrite.WalkSeries(raw, &d.rs, func(s *remotewrite.RawSeries) error {
		series++
		if series > lim.MaxSeries {
			return fmt.Errorf("%w: more than %d series", ErrTooLarge, lim.MaxSeries)
		}
		for _, l := range s.Labels {
			if len(l.Name) > lim.MaxLabelLength || len(l.Value) > lim.MaxLabelLength {
				return fmt.Errorf("%w: label %.64q longer than %d bytes", ErrTooLarge, l.Name, lim.MaxLabelLength)
			}
		}
		name := s.Label(LabelName)
		if len(s.Samples) != 1 {
			return malformed("series %q has %d samples, want 1", name, len(s.Samples))
		}
		if !header {
			if string(name) != MetricBatch {
				return malformed("first series is %q, want %s", name, MetricBatch)
			}
			header = true
			return d.header(s, b)
		}
		if wantPackets {
			if string(name) != MetricPackets || !sameLabels(d.prev, s.Labels) {
				return malformed("%s series not followed by %s with the same labels", MetricBytes, MetricPackets)
			}
			wantPackets = false
			cur.Packets = count(s.Samples[0].Value)
			b.Flows = append(b.Flows, cur)
			return nil
		}
		switch {
		case string(name) == MetricBytes:
			k, err := parseKey(s)
			if err != nil {
				return err
			}
			cur = flow.Record{Key: k, Counts: flow.Counts{Bytes: count(s.Samples[0].Value)}}
			d.prev = append(d.prev[:0], s.Labels...)
			wantPackets = true
		case bytes.HasPrefix(name, []byte(AgentMetricPrefix)):
			b.Metrics = append(b.Metrics, metric(s))
		default:
			return malformed("unexpected series %q", name)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !header {
		return malformed("empty request: no %s series", MetricBatch)
	}
	if wantPackets {
		return malformed("last %s series has no %s", MetricBytes, MetricPackets)
	}
	return nil
}

func (d *Decoder) header(s *remotewrite.RawSeries, b *Batch) error {
	node, inc, seq := s.Label(LabelNode), s.Label(LabelIncarnation), s.Label(LabelSeq)
	if len(node) == 0 || len(inc) == 0 {
		return malformed("%s without node or incarnation", MetricBatch)
	}
	n, err := strconv.ParseUint(unsafeString(seq), 10, 64)
	if err != nil || n == 0 {
		return malformed("%s: invalid seq %q", MetricBatch, seq)
	}
	b.Node, b.Incarnation, b.Seq = string(node), string(inc), n
	b.Time = time.UnixMilli(s.Samples[0].Timestamp)
	return nil
}

func parseKey(s *remotewrite.RawSeries) (flow.Key, error) {
	var k flow.Key
	var err error
	if k.Src, err = parseAddr(s.Label(LabelSrc)); err != nil {
		return k, malformed("src: %v", err)
	}
	if k.Dst, err = parseAddr(s.Label(LabelDst)); err != nil {
		return k, malformed("dst: %v", err)
	}
	if k.Proto, err = parseProto(s.Label(LabelProto)); err != nil {
		return k, malformed("%v", err)
	}
	if p := s.Label(LabelDport); p != nil {
		k.PortIsDst = true
		k.Port, err = parsePort(p)
	} else if p := s.Label(LabelSport); p != nil {
		k.Port, err = parsePort(p)
	}
	if err != nil {
		return k, malformed("port: %v", err)
	}
	return k, nil
}

func parseAddr(b []byte) (netip.Addr, error) {
	a, err := netip.ParseAddr(unsafeString(b))
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("invalid address %q", string(b))
	}
	return a, nil
}

func parsePort(b []byte) (uint16, error) {
	n, err := strconv.ParseUint(unsafeString(b), 10, 16)
	if err != nil {
		return 0, fmt.Errorf("invalid port %q", string(b))
	}
	return uint16(n), nil
}

// parseProto avoids the string conversion for the common names.
func parseProto(b []byte) (uint8, error) {
	switch string(b) {
	case "tcp":
		return 6, nil
	case "udp":
		return 17, nil
	}
	p, err := flow.ParseProto(string(b))
	return p, err
}

// count converts a sample value to a count, refusing what no counter holds.
func count(v float64) uint64 {
	if v < 0 || v != v || v > 1<<63 {
		return 0
	}
	return uint64(v)
}

func metric(s *remotewrite.RawSeries) Metric {
	m := Metric{Value: s.Samples[0].Value}
	for _, l := range s.Labels {
		switch string(l.Name) {
		case LabelName:
			m.Name = string(l.Value)
		case LabelNode:
		default:
			m.Labels = append(m.Labels, Label{Name: string(l.Name), Value: string(l.Value)})
		}
	}
	return m
}

func sameLabels(a, b []remotewrite.RawLabel) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i].Name, b[i].Name) {
			return false
		}
		if string(a[i].Name) != LabelName && !bytes.Equal(a[i].Value, b[i].Value) {
			return false
		}
	}
	return true
}

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", remotewrite.ErrMalformed, fmt.Sprintf(format, args...))
}

// unsafeString views b as a string without copying; only for parsers that
// do not retain their input.
func unsafeString(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(&b[0], len(b))
}
