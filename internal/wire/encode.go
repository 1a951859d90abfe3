package wire

import (
	"cmp"
	"slices"
	"strconv"

	"github.com/golang/snappy"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
)

// Encoder turns batches into compressed request bodies. It keeps its
// buffers between calls, so steady-state encoding allocates nothing; it is
// not safe for concurrent use.
type Encoder struct {
	sb      remotewrite.SeriesBuilder
	raw     []byte
	out     []byte
	scratch []byte
	order   []orderKey
}

// orderKey places flows with the same source and nearby destinations next
// to each other, which is what lets snappy find repeated label bytes; the
// order is not part of the contract. Comparing one integer keeps sorting
// 100,000 flows at a few milliseconds.
type orderKey struct {
	k uint64
	i int32
}

func keyOf(f *flow.Record) uint64 {
	s, d := f.Src.As16(), f.Dst.As16()
	return uint64(s[12])<<56 | uint64(s[13])<<48 | uint64(s[14])<<40 | uint64(s[15])<<32 |
		uint64(d[12])<<24 | uint64(d[13])<<16 | uint64(d[14])<<8 | uint64(d[15])
}

// Encode returns the snappy-compressed WriteRequest for b. The returned
// slice is owned by the encoder and valid until the next call.
func (e *Encoder) Encode(b *Batch) []byte {
	ts := b.Time.UnixMilli()
	e.raw = e.raw[:0]

	e.sb.Reset()
	e.sb.Label(LabelName, MetricBatch)
	e.sb.Label(LabelIncarnation, b.Incarnation)
	e.sb.Label(LabelNode, b.Node)
	e.scratch = strconv.AppendUint(e.scratch[:0], b.Seq, 10)
	e.sb.LabelBytes(LabelSeq, e.scratch)
	e.sb.Sample(float64(len(b.Flows)), ts)
	e.raw = e.sb.AppendTo(e.raw)

	e.order = e.order[:0]
	for i := range b.Flows {
		e.order = append(e.order, orderKey{k: keyOf(&b.Flows[i]), i: int32(i)})
	}
	slices.SortFunc(e.order, func(a, b orderKey) int { return cmp.Compare(a.k, b.k) })
	for _, o := range e.order {
		f := &b.Flows[o.i]
		e.flowSeries(MetricBytes, f, float64(f.Bytes))
		e.flowSeries(MetricPackets, f, float64(f.Packets))
	}
	for i := range b.Metrics {
		m := &b.Metrics[i]
		e.sb.Reset()
		e.sb.Label(LabelName, m.Name)
		// node sorts among the other labels.
		nodeDone := false
		for _, l := range m.Labels {
			if !nodeDone && l.Name > LabelNode {
				e.sb.Label(LabelNode, b.Node)
				nodeDone = true
			}
			e.sb.Label(l.Name, l.Value)
		}
		if !nodeDone {
			e.sb.Label(LabelNode, b.Node)
		}
		e.sb.Sample(m.Value, ts)
		e.raw = e.sb.AppendTo(e.raw)
	}
	// Grow the output with headroom: snappy allocates whenever the
	// destination is a byte short, and batch sizes wobble.
	if need := snappy.MaxEncodedLen(len(e.raw)); cap(e.out) < need {
		e.out = make([]byte, need+need/8)
	}
	e.out = snappy.Encode(e.out[:cap(e.out)], e.raw)
	return e.out
}

// flowSeries appends one flow series; labels in name order. Its sample
// carries no timestamp (protobuf omits a zero): the header's applies, and
// leaving it out saves about a tenth of the compressed bytes.
func (e *Encoder) flowSeries(name string, f *flow.Record, v float64) {
	e.sb.Reset()
	e.sb.Label(LabelName, name)
	hasPort := f.Port != 0 || f.Proto == 6 || f.Proto == 17 || f.Proto == 132
	if hasPort && f.PortIsDst {
		e.scratch = strconv.AppendUint(e.scratch[:0], uint64(f.Port), 10)
		e.sb.LabelBytes(LabelDport, e.scratch)
	}
	e.scratch = f.Dst.AppendTo(e.scratch[:0])
	e.sb.LabelBytes(LabelDst, e.scratch)
	e.sb.Label(LabelProto, flow.ProtoName(f.Proto))
	if hasPort && !f.PortIsDst {
		e.scratch = strconv.AppendUint(e.scratch[:0], uint64(f.Port), 10)
		e.sb.LabelBytes(LabelSport, e.scratch)
	}
	e.scratch = f.Src.AppendTo(e.scratch[:0])
	e.sb.LabelBytes(LabelSrc, e.scratch)
	e.sb.Sample(v, 0)
	e.raw = e.sb.AppendTo(e.raw)
}
