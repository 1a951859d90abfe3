// Package remotewrite speaks Prometheus remote-write 1.0: the protobuf
// WriteRequest, snappy block compression and the HTTP headers the
// specification requires. The codec here appends and walks the wire format
// directly (google.golang.org/protobuf/encoding/protowire) instead of going
// through prompb's generated structs, so that encoding and decoding on the
// hot paths allocate nothing once buffers are warm. prompb stays the
// reference: the tests check this codec against it.
package remotewrite

import (
	"errors"
	"fmt"
	"math"
	"slices"

	"google.golang.org/protobuf/encoding/protowire"
)

// Header values of a remote-write 1.0 request.
const (
	ContentType     = "application/x-protobuf"
	ContentEncoding = "snappy"
	ProtocolVersion = "0.1.0"
	// HeaderVersion is the header carrying ProtocolVersion.
	HeaderVersion = "X-Prometheus-Remote-Write-Version"
)

// StaleNaN is the value Prometheus reads as "this series ended" (a
// signalling NaN with payload 2); sent once for a series that went away.
var StaleNaN = math.Float64frombits(0x7ff0000000000002)

// IsStaleNaN reports whether v is the staleness marker.
func IsStaleNaN(v float64) bool { return math.Float64bits(v) == 0x7ff0000000000002 }

// Field numbers of the remote-write 1.0 messages (prompb types.proto).
const (
	fieldWriteRequestTimeseries = 1
	fieldSeriesLabels           = 1
	fieldSeriesSamples          = 2
	fieldSeriesExemplars        = 3
	fieldSeriesHistograms       = 4
	fieldLabelName              = 1
	fieldLabelValue             = 2
	fieldSampleValue            = 1
	fieldSampleTimestamp        = 2
)

// Sample is one value of a series at a time in milliseconds since the epoch.
type Sample struct {
	Value     float64
	Timestamp int64
}

// SeriesBuilder assembles one TimeSeries message. Labels must be added in
// ascending order of name, __name__ first, as the specification requires;
// the builder does not sort. Reuse one builder: after warm-up it allocates
// nothing.
type SeriesBuilder struct {
	body []byte
}

// Reset starts a new series.
func (s *SeriesBuilder) Reset() { s.body = s.body[:0] }

// labelGeneral adds a label of any size through protowire.
func (s *SeriesBuilder) labelGeneral(name, value string) {
	s.body = protowire.AppendTag(s.body, fieldSeriesLabels, protowire.BytesType)
	s.body = protowire.AppendVarint(s.body, uint64(labelSize(len(name), len(value))))
	s.body = appendString(s.body, fieldLabelName, name)
	s.body = appendString(s.body, fieldLabelValue, value)
}

// LabelBytes adds a label whose value is a byte slice (e.g. an address
// appended into a scratch buffer), avoiding a string allocation.
func (s *SeriesBuilder) LabelBytes(name string, value []byte) {
	s.body = AppendLabel(s.body, name, value)
}

// AppendLabel appends one encoded label field to b, exactly as LabelBytes
// adds it to a series: for encoders that write series without a builder,
// or that compare encoded labels (the wire decoder's flow name).
func AppendLabel(b []byte, name string, value []byte) []byte {
	b = protowire.AppendTag(b, fieldSeriesLabels, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(labelSize(len(name), len(value))))
	b = appendString(b, fieldLabelName, name)
	b = protowire.AppendTag(b, fieldLabelValue, protowire.BytesType)
	return protowire.AppendBytes(b, value)
}

// Sample adds a sample. Samples of one series must be in timestamp order.
func (s *SeriesBuilder) Sample(v float64, ts int64) {
	s.body = appendSample(s.body, v, ts)
}

// appendSample appends one TimeSeries.samples field to b: the value, and
// the timestamp unless it is 0 (proto3 leaves default values out).
func appendSample(b []byte, v float64, ts int64) []byte {
	size := 1 + 8
	if ts != 0 {
		size += 1 + protowire.SizeVarint(uint64(ts))
	}
	b = protowire.AppendTag(b, fieldSeriesSamples, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(size))
	b = protowire.AppendTag(b, fieldSampleValue, protowire.Fixed64Type)
	b = protowire.AppendFixed64(b, math.Float64bits(v))
	if ts != 0 {
		b = protowire.AppendTag(b, fieldSampleTimestamp, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(ts))
	}
	return b
}

// AppendTo appends the series as a WriteRequest.timeseries field to b.
// Concatenating such fields yields a valid WriteRequest.
func (s *SeriesBuilder) AppendTo(b []byte) []byte {
	b = protowire.AppendTag(b, fieldWriteRequestTimeseries, protowire.BytesType)
	return protowire.AppendBytes(b, s.body)
}

func labelSize(name, value int) int {
	return 1 + protowire.SizeVarint(uint64(name)) + name + 1 + protowire.SizeVarint(uint64(value)) + value
}

func appendString(b []byte, field protowire.Number, v string) []byte {
	b = protowire.AppendTag(b, field, protowire.BytesType)
	return protowire.AppendString(b, v)
}

// RawLabel is a label as it sits in a request body; the slices alias the
// body and are only valid until the walker moves on.
type RawLabel struct {
	Name, Value []byte
}

// RawSeries is one TimeSeries of a request, reused between calls.
type RawSeries struct {
	Labels  []RawLabel
	Samples []Sample
	// Skipped says the series had exemplars or histograms, which the
	// walker skips unread: a reader with no use for them refuses such a
	// series rather than accept what it did not check.
	Skipped bool
}

// Label returns the value of the label called name, or nil.
func (s *RawSeries) Label(name string) []byte {
	for i := range s.Labels {
		if string(s.Labels[i].Name) == name {
			return s.Labels[i].Value
		}
	}
	return nil
}

// ErrMalformed wraps every decoding error, so that servers answer 400.
var ErrMalformed = errors.New("malformed remote-write request")

// WalkSeries calls fn for every TimeSeries of an uncompressed WriteRequest,
// reusing s. Fields other than labels and samples (exemplars, histograms,
// metadata) are skipped. It allocates nothing once s has grown.
func WalkSeries(body []byte, s *RawSeries, fn func(*RawSeries) error) error {
	for len(body) > 0 {
		num, typ, n := protowire.ConsumeTag(body)
		if n < 0 {
			return fmt.Errorf("%w: write request: %w", ErrMalformed, protowire.ParseError(n))
		}
		body = body[n:]
		if num != fieldWriteRequestTimeseries || typ != protowire.BytesType {
			if err := WrongType(MsgWriteRequest, num, typ); err != nil {
				return err
			}
			n = protowire.ConsumeFieldValue(num, typ, body)
			if n < 0 {
				return fmt.Errorf("%w: write request field %d: %w", ErrMalformed, num, protowire.ParseError(n))
			}
			body = body[n:]
			continue
		}
		msg, n := protowire.ConsumeBytes(body)
		if n < 0 {
			return fmt.Errorf("%w: timeseries: %w", ErrMalformed, protowire.ParseError(n))
		}
		body = body[n:]
		if err := parseSeries(msg, s); err != nil {
			return err
		}
		if err := fn(s); err != nil {
			return err
		}
	}
	return nil
}

func parseSeries(msg []byte, s *RawSeries) error {
	s.Labels = s.Labels[:0]
	s.Samples = s.Samples[:0]
	s.Skipped = false
	for len(msg) > 0 {
		num, typ, n := protowire.ConsumeTag(msg)
		if n < 0 {
			return fmt.Errorf("%w: timeseries field: %w", ErrMalformed, protowire.ParseError(n))
		}
		msg = msg[n:]
		switch {
		case num == fieldSeriesLabels && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(msg)
			if n < 0 {
				return fmt.Errorf("%w: label: %w", ErrMalformed, protowire.ParseError(n))
			}
			msg = msg[n:]
			l, err := parseLabel(v)
			if err != nil {
				return err
			}
			s.Labels = append(s.Labels, l)
		case num == fieldSeriesSamples && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(msg)
			if n < 0 {
				return fmt.Errorf("%w: sample: %w", ErrMalformed, protowire.ParseError(n))
			}
			msg = msg[n:]
			smp, err := parseSample(v)
			if err != nil {
				return err
			}
			s.Samples = append(s.Samples, smp)
		default:
			if err := WrongType(MsgTimeSeries, num, typ); err != nil {
				return err
			}
			n = protowire.ConsumeFieldValue(num, typ, msg)
			if n < 0 {
				return fmt.Errorf("%w: timeseries field %d: %w", ErrMalformed, num, protowire.ParseError(n))
			}
			msg = msg[n:]
			if num == fieldSeriesExemplars || num == fieldSeriesHistograms {
				s.Skipped = true
			}
		}
	}
	return nil
}

func parseLabel(b []byte) (RawLabel, error) {
	var l RawLabel
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return l, fmt.Errorf("%w: label field: %w", ErrMalformed, protowire.ParseError(n))
		}
		b = b[n:]
		if typ == protowire.BytesType && (num == fieldLabelName || num == fieldLabelValue) {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return l, fmt.Errorf("%w: label string: %w", ErrMalformed, protowire.ParseError(n))
			}
			b = b[n:]
			if num == fieldLabelName {
				l.Name = v
			} else {
				l.Value = v
			}
			continue
		}
		if err := WrongType(MsgLabel, num, typ); err != nil {
			return l, err
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return l, fmt.Errorf("%w: label field %d: %w", ErrMalformed, num, protowire.ParseError(n))
		}
		b = b[n:]
	}
	return l, nil
}

func parseSample(b []byte) (Sample, error) {
	var s Sample
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return s, fmt.Errorf("%w: sample field: %w", ErrMalformed, protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == fieldSampleValue && typ == protowire.Fixed64Type:
			v, n := protowire.ConsumeFixed64(b)
			if n < 0 {
				return s, fmt.Errorf("%w: sample value: %w", ErrMalformed, protowire.ParseError(n))
			}
			b = b[n:]
			s.Value = math.Float64frombits(v)
		case num == fieldSampleTimestamp && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return s, fmt.Errorf("%w: sample timestamp: %w", ErrMalformed, protowire.ParseError(n))
			}
			b = b[n:]
			s.Timestamp = int64(v)
		default:
			if err := WrongType(MsgSample, num, typ); err != nil {
				return s, err
			}
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return s, fmt.Errorf("%w: sample field %d: %w", ErrMalformed, num, protowire.ParseError(n))
			}
			b = b[n:]
		}
	}
	return s, nil
}

// Label adds a label. The usual label's whole message is under 128 bytes,
// so every length is a one-byte varint and tags and lengths are appended as
// bytes instead of through protowire: the pusher encodes every label of
// every series every push, the hottest loop of a 100,000-series snapshot.
func (s *SeriesBuilder) Label(name, value string) {
	n, v := len(name), len(value)
	if size := 2 + n + 2 + v; size < 128 {
		b := slices.Grow(s.body, 2+size)
		o := len(b)
		b = b[:o+2+size]
		b[o] = byte(fieldSeriesLabels<<3 | protowire.BytesType)
		b[o+1] = byte(size)
		b[o+2] = byte(fieldLabelName<<3 | protowire.BytesType)
		b[o+3] = byte(n)
		copy(b[o+4:], name)
		o += 4 + n
		b[o] = byte(fieldLabelValue<<3 | protowire.BytesType)
		b[o+1] = byte(v)
		copy(b[o+2:], value)
		s.body = b
		return
	}
	s.labelGeneral(name, value)
}

// encoded returns the series message built so far; it aliases the
// builder's buffer and is valid until the next call on s.
func (s *SeriesBuilder) encoded() []byte { return s.body }

// Message names a remote-write 1.0 message, for WrongType.
type Message uint8

// The messages of a remote-write 1.0 request.
const (
	MsgWriteRequest Message = iota
	MsgTimeSeries
	MsgLabel
	MsgSample
)

// messageFields are the wire types of each message's fields (prompb); a
// field not listed is unknown and skipped, as protobuf says.
var messageFields = [...]struct {
	name   string
	fields map[protowire.Number]protowire.Type
}{
	MsgWriteRequest: {"write request", map[protowire.Number]protowire.Type{1: protowire.BytesType, 3: protowire.BytesType}},
	MsgTimeSeries:   {"timeseries", map[protowire.Number]protowire.Type{1: protowire.BytesType, 2: protowire.BytesType, 3: protowire.BytesType, 4: protowire.BytesType}},
	MsgLabel:        {"label", map[protowire.Number]protowire.Type{1: protowire.BytesType, 2: protowire.BytesType}},
	MsgSample:       {"sample", map[protowire.Number]protowire.Type{1: protowire.Fixed64Type, 2: protowire.VarintType}},
}

// WrongType refuses a known field of message m sent with another wire
// type than its own, as Prometheus' own receiver (prompb) does, so that
// what is accepted here is what any remote-write receiver would accept.
// Decoders call it for each field they are about to skip.
func WrongType(m Message, num protowire.Number, typ protowire.Type) error {
	mf := messageFields[m]
	if want, ok := mf.fields[num]; ok && typ != want {
		return fmt.Errorf("%w: %s field %d: wire type %d, want %d", ErrMalformed, mf.name, num, typ, want)
	}
	return nil
}
