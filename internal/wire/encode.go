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
	labels  []byte
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
		e.flowLabels(f)
		e.flowSeries(MetricBytes, float64(f.Bytes))
		e.flowSeries(MetricPackets, float64(f.Packets))
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

// flowLabels encodes a flow's labels but __name__, in name order, once
// for its two series.
func (e *Encoder) flowLabels(f *flow.Record) {
	e.labels = e.labels[:0]
	hasPort := f.Port != 0 || f.Proto == 6 || f.Proto == 17 || f.Proto == 132
	if hasPort && f.PortIsDst {
		e.scratch = strconv.AppendUint(e.scratch[:0], uint64(f.Port), 10)
		e.labels = remotewrite.AppendLabel(e.labels, LabelDport, e.scratch)
	}
	e.scratch = f.Dst.AppendTo(e.scratch[:0])
	e.labels = remotewrite.AppendLabel(e.labels, LabelDst, e.scratch)
	e.scratch = append(e.scratch[:0], flow.ProtoName(f.Proto)...)
	e.labels = remotewrite.AppendLabel(e.labels, LabelProto, e.scratch)
	if hasPort && !f.PortIsDst {
		e.scratch = strconv.AppendUint(e.scratch[:0], uint64(f.Port), 10)
		e.labels = remotewrite.AppendLabel(e.labels, LabelSport, e.scratch)
	}
	e.scratch = f.Src.AppendTo(e.scratch[:0])
	e.labels = remotewrite.AppendLabel(e.labels, LabelSrc, e.scratch)
}

// flowSeries appends one flow series with the labels of flowLabels. Its
// sample carries no timestamp (protobuf omits a zero): the header's
// applies, and leaving it out saves about a tenth of the compressed bytes.
func (e *Encoder) flowSeries(name string, v float64) {
	e.sb.Reset()
	e.sb.Label(LabelName, name)
	e.sb.Raw(e.labels)
	e.sb.Sample(v, 0)
	e.raw = e.sb.AppendTo(e.raw)
}
