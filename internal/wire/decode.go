package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"time"
	"unsafe"

	"github.com/golang/snappy"
	"google.golang.org/protobuf/encoding/protowire"

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

// Remote-write 1.0 fields the wire contract has no use for, refused
// rather than skipped: a message skipped unread may be one remote-write
// itself refuses.
const (
	fieldMetadata   = 3 // WriteRequest.metadata
	fieldExemplars  = 3 // TimeSeries.exemplars
	fieldHistograms = 4 // TimeSeries.histograms
)

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
// the self-metrics, nothing per flow.
type Decoder struct {
	Limits Limits
	raw    []byte
	rs     remotewrite.RawSeries
}

// Decode decompresses and parses body into b, reusing b.Flows.
func (d *Decoder) Decode(body []byte, b *Batch) error {
	lim := d.Limits.withDefaults()
	n, err := snappy.DecodedLen(body)
	if err != nil {
		return fmt.Errorf("%w: snappy: %w", remotewrite.ErrMalformed, err)
	}
	if n > lim.MaxDecodedBytes {
		return fmt.Errorf("%w: decoded body of %d bytes exceeds %d", ErrTooLarge, n, lim.MaxDecodedBytes)
	}
	if cap(d.raw) < n {
		d.raw = make([]byte, n)
	}
	raw, err := snappy.Decode(d.raw[:cap(d.raw)], body)
	if err != nil {
		return fmt.Errorf("%w: snappy: %w", remotewrite.ErrMalformed, err)
	}
	return d.DecodeRaw(raw, b)
}

// DecodeRaw parses an uncompressed WriteRequest into b.
//
// Flow series, nearly all of a request, are parsed here in one pass over
// their bytes straight into a flow.Record; the batch header and the
// self-metrics go through remotewrite.WalkSeries.
func (d *Decoder) DecodeRaw(raw []byte, b *Batch) error {
	lim := d.Limits.withDefaults()
	*b = Batch{Flows: b.Flows[:0], Released: b.Released[:0], Metrics: b.Metrics[:0]}
	series := 0
	header := false
	var prev lastSrc
	other := func(s *remotewrite.RawSeries) error {
		if s.Skipped {
			return malformed("series with exemplars or histograms: not part of the wire contract")
		}
		for _, l := range s.Labels {
			if len(l.Name) > lim.MaxLabelLength || len(l.Value) > lim.MaxLabelLength {
				return fmt.Errorf("%w: label %.64q longer than %d bytes", ErrTooLarge, l.Name, lim.MaxLabelLength)
			}
		}
		name := s.Label(LabelName)
		switch {
		case !header && string(name) != MetricBatch:
			return malformed("first series is %q, want %s", name, MetricBatch)
		case string(name) == MetricFlow:
			return malformed("%s series whose first label is not __name__ (series %d)", MetricFlow, series)
		case string(name) == MetricReleased:
			return d.released(s, b)
		case !bytes.HasPrefix(name, []byte(AgentMetricPrefix)):
			return malformed("unexpected series %q", name)
		case len(s.Samples) != 1:
			return malformed("series %q has %d samples, want 1", name, len(s.Samples))
		case !header:
			header = true
			return d.header(s, b)
		}
		b.Metrics = append(b.Metrics, metric(s))
		return nil
	}
	for len(raw) > 0 {
		// WriteRequest.timeseries (field 1, bytes). A flow series' length
		// is a varint of one byte (IPv4) or two, read here; the rest
		// goes through protowire.
		var msg, field []byte
		switch {
		case len(raw) >= 2 && raw[0] == 0x0a && raw[1] < 0x80 && int(raw[1]) <= len(raw)-2:
			n := 2 + int(raw[1])
			field, msg, raw = raw[:n], raw[2:n], raw[n:]
		case len(raw) >= 3 && raw[0] == 0x0a && raw[1] >= 0x80 && raw[2] < 0x80 && int(raw[1]&0x7f)|int(raw[2])<<7 <= len(raw)-3:
			n := 3 + (int(raw[1]&0x7f) | int(raw[2])<<7)
			field, msg, raw = raw[:n], raw[3:n], raw[n:]
		default:
			num, typ, n := protowire.ConsumeTag(raw)
			if n < 0 {
				return fmt.Errorf("%w: write request: %w", remotewrite.ErrMalformed, protowire.ParseError(n))
			}
			if num != 1 || typ != protowire.BytesType {
				if num == fieldMetadata {
					return fmt.Errorf("%w: write request field %d (metadata): not part of the wire contract", remotewrite.ErrMalformed, num)
				}
				if err := remotewrite.WrongType(remotewrite.MsgWriteRequest, num, typ); err != nil {
					return err
				}
				m := protowire.ConsumeFieldValue(num, typ, raw[n:])
				if m < 0 {
					return fmt.Errorf("%w: write request field %d: %w", remotewrite.ErrMalformed, num, protowire.ParseError(m))
				}
				raw = raw[n+m:]
				continue
			}
			v, m := protowire.ConsumeBytes(raw[n:])
			if m < 0 {
				return fmt.Errorf("%w: timeseries: %w", remotewrite.ErrMalformed, protowire.ParseError(m))
			}
			field, msg, raw = raw[:n+m], v, raw[n+m:]
		}
		series++
		if series > lim.MaxSeries {
			return fmt.Errorf("%w: more than %d series", ErrTooLarge, lim.MaxSeries)
		}
		if header {
			if rest, ok := flowSeries(msg); ok {
				// Parsed in place: a flow.Record is 72 bytes.
				b.Flows = append(b.Flows, flow.Record{})
				if err := parseFlow(&b.Flows[len(b.Flows)-1], rest, len(msg) > lim.MaxLabelLength, lim.MaxLabelLength, &prev); err != nil {
					b.Flows = b.Flows[:len(b.Flows)-1]
					return fmt.Errorf("%w, in series %d", err, series)
				}
				continue
			}
		}
		if err := remotewrite.WalkSeries(field, &d.rs, other); err != nil {
			return err
		}
	}
	if !header {
		return malformed("empty request: no %s series", MetricBatch)
	}
	return nil
}

// flowName is the __name__ label of a flow series as encoders write it.
var flowName = string(remotewrite.AppendLabel(nil, LabelName, []byte(MetricFlow)))

// flowSeries reports whether the TimeSeries message msg is a flow series,
// i.e. its first field is the label __name__="kubezonnet_flow", and
// returns the fields after that label.
func flowSeries(msg []byte) ([]byte, bool) {
	if len(msg) >= len(flowName) && string(msg[:len(flowName)]) == flowName {
		return msg[len(flowName):], true
	}
	// The same label encoded otherwise (e.g. with unknown fields).
	num, typ, n := protowire.ConsumeTag(msg)
	if n < 0 || num != 1 || typ != protowire.BytesType {
		return nil, false
	}
	v, m := protowire.ConsumeBytes(msg[n:])
	if m < 0 {
		return nil, false
	}
	name, value, err := parseLabel(v)
	if err != nil || string(name) != LabelName || string(value) != MetricFlow {
		return nil, false
	}
	return msg[n+m:], true
}

// Flow labels in the order of their names, as a flow series sorts them
// after __name__.
const (
	rankName = iota
	rankDport
	rankDst
	rankOrigDst
	rankProto
	rankSport
	rankSrc
)

// lastSrc is the previous flow's source label and address. Encoders order
// flows by source, so most flows repeat it and skip the parse.
type lastSrc struct {
	raw  []byte // aliases the request
	addr netip.Addr
}

// parseFlow parses the fields of a flow series after its __name__ label:
// the other labels, in name order, and exactly two samples, into f (zero).
// checkLen says the series is long enough for a label to exceed maxLen.
//
// The labels and samples as every encoder writes them (one-byte lengths,
// name before value, no other fields) are read in place; anything else
// protobuf allows goes through protowire.
func parseFlow(f *flow.Record, msg []byte, checkLen bool, maxLen int, prev *lastSrc) error {
	last := rankName
	samples := 0
	var seen uint8 // bit per rank
	for len(msg) > 0 {
		var name, value []byte
		var smp remotewrite.Sample
		isLabel := false
		switch c := msg[0]; {
		case c == 0x0a && len(msg) >= 6 && msg[1] < 0x80 && int(msg[1]) <= len(msg)-2:
			// Label: 0x0a len 0x0a nameLen name 0x12 valueLen value.
			l := msg[2 : 2+int(msg[1])]
			msg = msg[2+len(l):]
			isLabel = true
			if len(l) >= 4 && l[0] == 0x0a && int(l[1]) <= len(l)-4 && l[2+l[1]] == 0x12 && int(l[3+l[1]]) == len(l)-4-int(l[1]) {
				nl := int(l[1])
				name, value = l[2:2+nl], l[4+nl:]
			} else {
				var err error
				if name, value, err = parseLabel(l); err != nil {
					return err
				}
			}
		case c == 0x12 && len(msg) >= 11 && msg[1] == 9 && msg[2] == 0x09:
			// Sample: 0x12 9 0x09 value (fixed64), no timestamp.
			smp.Value = math.Float64frombits(binary.LittleEndian.Uint64(msg[3:11]))
			msg = msg[11:]
		default:
			num, typ, n := protowire.ConsumeTag(msg)
			if n < 0 {
				return fmt.Errorf("%w: timeseries field: %w", remotewrite.ErrMalformed, protowire.ParseError(n))
			}
			msg = msg[n:]
			if typ != protowire.BytesType || (num != 1 && num != 2) {
				// Exemplars and histograms are refused (no agent sends
				// them, and skipping them unread would accept what
				// remote-write refuses); unknown fields are skipped.
				if num == fieldExemplars || num == fieldHistograms {
					return fmt.Errorf("%w: timeseries field %d (exemplars or histograms): not part of the wire contract", remotewrite.ErrMalformed, num)
				}
				if err := remotewrite.WrongType(remotewrite.MsgTimeSeries, num, typ); err != nil {
					return err
				}
				n = protowire.ConsumeFieldValue(num, typ, msg)
				if n < 0 {
					return fmt.Errorf("%w: timeseries field %d: %w", remotewrite.ErrMalformed, num, protowire.ParseError(n))
				}
				msg = msg[n:]
				continue
			}
			v, n := protowire.ConsumeBytes(msg)
			if n < 0 {
				return fmt.Errorf("%w: timeseries field %d: %w", remotewrite.ErrMalformed, num, protowire.ParseError(n))
			}
			msg = msg[n:]
			var err error
			if num == 1 {
				isLabel = true
				name, value, err = parseLabel(v)
			} else {
				smp, err = parseSample(v)
			}
			if err != nil {
				return err
			}
		}

		if !isLabel {
			samples++
			if smp.Timestamp != 0 {
				return malformed("%s sample with timestamp %d; flow samples carry none, the header's applies", MetricFlow, smp.Timestamp)
			}
			n, err := count(smp.Value)
			if err != nil {
				return err
			}
			switch samples {
			case 1:
				f.Bytes = n
			case 2:
				f.Packets = n
			}
			continue
		}

		if checkLen && (len(name) > maxLen || len(value) > maxLen) {
			return fmt.Errorf("%w: label %.64q longer than %d bytes", ErrTooLarge, name, maxLen)
		}
		// Label names by length and first byte, then in full.
		rank := -1
		switch len(name) {
		case 3:
			if name[0] == 'd' && string(name) == LabelDst {
				rank = rankDst
			} else if name[0] == 's' && string(name) == LabelSrc {
				rank = rankSrc
			}
		case 5:
			if name[0] == 'd' && string(name) == LabelDport {
				rank = rankDport
			} else if name[0] == 'p' && string(name) == LabelProto {
				rank = rankProto
			} else if name[0] == 's' && string(name) == LabelSport {
				rank = rankSport
			}
		case 8:
			if name[0] == 'o' && string(name) == LabelOrigDst {
				rank = rankOrigDst
			} else if string(name) == LabelName {
				rank = rankName
			}
		}
		if rank < 0 {
			return malformed("%s series with unexpected label %.64q", MetricFlow, name)
		}
		if rank <= last {
			return malformed("%s labels not sorted by name or repeated: %q", MetricFlow, name)
		}
		last = rank
		seen |= 1 << rank
		var err error
		switch rank {
		case rankSrc:
			if string(value) == string(prev.raw) && prev.raw != nil {
				f.Src = prev.addr
			} else if f.Src, err = parseAddr(LabelSrc, value); err == nil {
				prev.raw, prev.addr = value, f.Src
			}
		case rankDst:
			f.Dst, err = parseAddr(LabelDst, value)
		case rankOrigDst:
			f.OrigDst, err = parseAddrPort(LabelOrigDst, value)
		case rankProto:
			f.Proto, err = parseProto(value)
		case rankDport:
			f.PortIsDst = true
			f.Port, err = parsePort(LabelDport, value)
		case rankSport:
			f.Port, err = parsePort(LabelSport, value)
		}
		if err != nil {
			return err
		}
	}
	const required = 1<<rankSrc | 1<<rankDst | 1<<rankProto
	if seen&required != required {
		return malformed("%s series without %s, %s or %s", MetricFlow, LabelSrc, LabelDst, LabelProto)
	}
	if samples != 2 {
		return malformed("%s series has %d samples, want 2 (bytes, packets)", MetricFlow, samples)
	}
	ports := seen & (1<<rankDport | 1<<rankSport)
	switch {
	case ports == 1<<rankDport|1<<rankSport:
		return malformed("%s series with both %s and %s", MetricFlow, LabelDport, LabelSport)
	case ports == 0 && hasPort(f.Proto, 0):
		return malformed("%s series of proto %s without %s or %s", MetricFlow, flow.ProtoName(f.Proto), LabelDport, LabelSport)
	case ports != 0 && !hasPort(f.Proto, f.Port):
		return malformed("%s series of proto %s with port 0", MetricFlow, flow.ProtoName(f.Proto))
	}
	return nil
}

// parseLabel parses a Label message of any encoding protobuf allows.
func parseLabel(b []byte) (name, value []byte, err error) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, nil, fmt.Errorf("%w: label field: %w", remotewrite.ErrMalformed, protowire.ParseError(n))
		}
		b = b[n:]
		if typ == protowire.BytesType && (num == 1 || num == 2) {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return nil, nil, fmt.Errorf("%w: label string: %w", remotewrite.ErrMalformed, protowire.ParseError(n))
			}
			b = b[n:]
			if num == 1 {
				name = v
			} else {
				value = v
			}
			continue
		}
		if err := remotewrite.WrongType(remotewrite.MsgLabel, num, typ); err != nil {
			return nil, nil, err
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return nil, nil, fmt.Errorf("%w: label field %d: %w", remotewrite.ErrMalformed, num, protowire.ParseError(n))
		}
		b = b[n:]
	}
	return name, value, nil
}

// parseSample parses a Sample message of any encoding protobuf allows.
func parseSample(b []byte) (remotewrite.Sample, error) {
	var s remotewrite.Sample
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return s, fmt.Errorf("%w: sample field: %w", remotewrite.ErrMalformed, protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.Fixed64Type:
			v, n := protowire.ConsumeFixed64(b)
			if n < 0 {
				return s, fmt.Errorf("%w: sample value: %w", remotewrite.ErrMalformed, protowire.ParseError(n))
			}
			b = b[n:]
			s.Value = math.Float64frombits(v)
		case num == 2 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return s, fmt.Errorf("%w: sample timestamp: %w", remotewrite.ErrMalformed, protowire.ParseError(n))
			}
			b = b[n:]
			s.Timestamp = int64(v)
		default:
			if err := remotewrite.WrongType(remotewrite.MsgSample, num, typ); err != nil {
				return s, err
			}
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return s, fmt.Errorf("%w: sample field %d: %w", remotewrite.ErrMalformed, num, protowire.ParseError(n))
			}
			b = b[n:]
		}
	}
	return s, nil
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

// released appends the address of a kubezonnet_address_released series.
func (d *Decoder) released(s *remotewrite.RawSeries, b *Batch) error {
	if len(s.Samples) != 1 {
		return malformed("series %q has %d samples, want 1", MetricReleased, len(s.Samples))
	}
	for _, l := range s.Labels {
		if n := string(l.Name); n != LabelName && n != LabelAddress {
			return malformed("%s: unexpected label %.64q", MetricReleased, l.Name)
		}
	}
	a, err := parseAddr(LabelAddress, s.Label(LabelAddress))
	if err != nil {
		return err
	}
	if ts := s.Samples[0].Timestamp; ts <= 0 || ts > b.Time.UnixMilli() {
		return malformed("%s %s: time %d not within (0, the batch's %d]", MetricReleased, a, ts, b.Time.UnixMilli())
	}
	b.Released = append(b.Released, Release{Addr: a, Time: time.UnixMilli(s.Samples[0].Timestamp)})
	return nil
}

// parseAddr parses an address label.
func parseAddr(label string, b []byte) (netip.Addr, error) {
	a, err := netip.ParseAddr(unsafeString(b))
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, malformed("%s: invalid address %.64q", label, b)
	}
	return a, nil
}

// parseAddrPort parses an address-and-port label as netip.ParseAddrPort
// does (an IPv6 address in brackets), refusing zones as parseAddr does.
func parseAddrPort(label string, b []byte) (netip.AddrPort, error) {
	p, err := netip.ParseAddrPort(unsafeString(b))
	if err != nil || p.Addr().Zone() != "" {
		return netip.AddrPort{}, malformed("%s: invalid address and port %.64q", label, b)
	}
	return p, nil
}

func parsePort(label string, b []byte) (uint16, error) {
	n, err := strconv.ParseUint(unsafeString(b), 10, 16)
	if err != nil {
		return 0, malformed("%s: invalid port %.64q", label, b)
	}
	return uint16(n), nil
}

func parseProto(b []byte) (uint8, error) {
	p, err := flow.ParseProto(unsafeString(b))
	if err != nil {
		return 0, malformed("invalid %s %.64q", LabelProto, b)
	}
	return p, nil
}

// count converts a flow sample's value to a count, refusing what no
// counter holds: negative, NaN (the staleness marker too), fractional or
// 2^64 and beyond.
func count(v float64) (uint64, error) {
	if !(v >= 0 && v < 1<<64) {
		return 0, malformed("%s sample value %v is not a count", MetricFlow, v)
	}
	n := uint64(v)
	if float64(n) != v {
		return 0, malformed("%s sample value %v is not an integer", MetricFlow, v)
	}
	return n, nil
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

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", remotewrite.ErrMalformed, fmt.Sprintf(format, args...))
}

// unsafeString views b as a string without copying; only for parsers that
// do not retain their input.
//
// Kept for the ingest budget of no allocation per flow (BenchmarkDecode,
// BENCHMARKS.md "Agent"): netip.ParseAddr(unsafeString(b)) allocates per address.
func unsafeString(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(&b[0], len(b))
}
