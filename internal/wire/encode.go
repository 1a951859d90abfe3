package wire

import (
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
}

// SortFlows orders flows so that similar label sets sit together (by
// source, then destination, protocol and port), which roughly halves what
// snappy has to carry. The order is not part of the contract.
func SortFlows(flows []flow.Record) {
	slices.SortFunc(flows, func(a, b flow.Record) int {
		if c := a.Src.Compare(b.Src); c != 0 {
			return c
		}
		if c := a.Dst.Compare(b.Dst); c != 0 {
			return c
		}
		if a.Proto != b.Proto {
			return int(a.Proto) - int(b.Proto)
		}
		if a.Port != b.Port {
			return int(a.Port) - int(b.Port)
		}
		if a.PortIsDst != b.PortIsDst {
			if a.PortIsDst {
				return -1
			}
			return 1
		}
		return 0
	})
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

	for i := range b.Flows {
		f := &b.Flows[i]
		e.flowSeries(MetricBytes, f, float64(f.Bytes), ts)
		e.flowSeries(MetricPackets, f, float64(f.Packets), ts)
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
	e.out = snappy.Encode(e.out[:cap(e.out)], e.raw)
	return e.out
}

// flowSeries appends one flow series; labels in name order.
func (e *Encoder) flowSeries(name string, f *flow.Record, v float64, ts int64) {
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
	e.sb.Sample(v, ts)
	e.raw = e.sb.AppendTo(e.raw)
}
