package wire

import (
	"cmp"
	"encoding/binary"
	"math"
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
	scratch []byte
	raw     []byte
	comp    []byte
	order   []orderKey
	tmp     []orderKey
}

// orderKey places flows with the same source and nearby destinations next
// to each other, which is what lets snappy find repeated label bytes; the
// order is not part of the contract.
type orderKey struct {
	k uint64
	i int32
}

func keyOf(f *flow.Record) uint64 {
	s, d := f.Src.As16(), f.Dst.As16()
	return uint64(s[12])<<56 | uint64(s[13])<<48 | uint64(s[14])<<40 | uint64(s[15])<<32 |
		uint64(d[12])<<24 | uint64(d[13])<<16 | uint64(d[14])<<8 | uint64(d[15])
}

// sortKeys sorts a by key: a least significant digit radix sort, a byte
// per pass, skipping the bytes all keys share, through tmp (grown as
// needed). It returns the sorted slice (a or tmp) and tmp.
//
// Kept over slices.SortFunc for the agent's flush budget: BenchmarkSortKeys's
// slices baseline against DrainEncodeFlush (BENCHMARKS.md, "Agent").
func sortKeys(a, tmp []orderKey) (sorted, _ []orderKey) {
	if len(a) < 256 {
		slices.SortFunc(a, func(x, y orderKey) int { return cmp.Compare(x.k, y.k) })
		return a, tmp
	}
	var counts [8][256]int32
	for _, o := range a {
		k := o.k
		counts[0][byte(k)]++
		counts[1][byte(k>>8)]++
		counts[2][byte(k>>16)]++
		counts[3][byte(k>>24)]++
		counts[4][byte(k>>32)]++
		counts[5][byte(k>>40)]++
		counts[6][byte(k>>48)]++
		counts[7][byte(k>>56)]++
	}
	tmp = slices.Grow(tmp[:0], len(a))[:len(a)]
	src, dst := a, tmp
	for d := range counts {
		c := &counts[d]
		shift := 8 * d
		if int(c[byte(a[0].k>>shift)]) == len(a) {
			continue // one value: the order stays
		}
		sum := int32(0)
		for i, n := range c {
			c[i] = sum
			sum += n
		}
		for _, o := range src {
			v := byte(o.k >> shift)
			dst[c[v]] = o
			c[v]++
		}
		src, dst = dst, src
	}
	return src, tmp
}

// sortBlock is the number of flows ordered together (see Encode).
const sortBlock = 4096

// Encode returns the snappy-compressed WriteRequest for b. The returned
// slice is owned by the encoder and valid until the next call.
//
// Flows are ordered within blocks, not across the whole batch: snappy
// only finds repeats within the last 64 KiB (some 600 flows), so a block
// of sortBlock flows holds nearly all the repeats a full sort would bring
// together, and its records (~300 KB) stay in the CPU's cache while they
// are read in key order; a full sort reads every record at random, a
// cache miss each.
func (e *Encoder) Encode(b *Batch) []byte {
	ts := b.Time.UnixMilli()
	// An IPv4 flow takes about 125 bytes: grow once, not by doubling.
	e.raw = slices.Grow(e.raw[:0], 256+128*len(b.Flows))
	e.sb.Reset()
	e.sb.Label(LabelName, MetricBatch)
	e.sb.Label(LabelIncarnation, b.Incarnation)
	e.sb.Label(LabelNode, b.Node)
	e.scratch = strconv.AppendUint(e.scratch[:0], b.Seq, 10)
	e.sb.LabelBytes(LabelSeq, e.scratch)
	e.sb.Sample(float64(len(b.Flows)), ts)
	e.raw = e.sb.AppendTo(e.raw)

	for start := 0; start < len(b.Flows); start += sortBlock {
		block := b.Flows[start:min(start+sortBlock, len(b.Flows))]
		e.order = slices.Grow(e.order[:0], len(block))
		for i := range block {
			e.order = append(e.order, orderKey{k: keyOf(&block[i]), i: int32(i)})
		}
		var sorted []orderKey
		sorted, e.tmp = sortKeys(e.order, e.tmp)
		for _, o := range sorted {
			e.raw = appendFlow(e.raw, &block[o.i])
		}
	}

	for _, r := range b.Released {
		e.sb.Reset()
		e.sb.Label(LabelName, MetricReleased)
		e.scratch = r.Addr.AppendTo(e.scratch[:0])
		e.sb.LabelBytes(LabelAddress, e.scratch)
		e.sb.Sample(1, r.Time.UnixMilli())
		e.raw = e.sb.AppendTo(e.raw)
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
	if need := snappy.MaxEncodedLen(len(e.raw)); cap(e.comp) < need {
		e.comp = make([]byte, need+need/8)
	}
	e.comp = snappy.Encode(e.comp[:cap(e.comp)], e.raw)
	return e.comp
}

// hasPort reports whether a flow's series carries a port label: always
// for the protocols with ports, and for any other that has a port.
func hasPort(proto uint8, port uint16) bool {
	return port != 0 || proto == 6 || proto == 17 || proto == 132
}

// appendFlow appends a flow's series (a WriteRequest.timeseries field) to
// b. It writes the protobuf directly: every length but the series' own is
// below 128, so one byte, patched once the value is in place.
//
// Kept over remotewrite.SeriesBuilder for the agent's flush budget:
// BenchmarkAppendFlow's builder baseline against DrainEncodeFlush (BENCHMARKS.md, "Agent").
func appendFlow(b []byte, f *flow.Record) []byte {
	b = append(b, 0x0a, 0) // WriteRequest.timeseries, length patched below
	start := len(b)
	b = append(b, flowName...)
	port := hasPort(f.Proto, f.Port)
	var o int
	if port && f.PortIsDst {
		b, o = labelStart(b, LabelDport)
		b = strconv.AppendUint(b, uint64(f.Port), 10)
		labelEnd(b, o, len(LabelDport))
	}
	b, o = labelStart(b, LabelDst)
	b = f.Dst.AppendTo(b)
	labelEnd(b, o, len(LabelDst))
	if f.OrigDst.IsValid() {
		b, o = labelStart(b, LabelOrigDst)
		b = f.OrigDst.AppendTo(b)
		labelEnd(b, o, len(LabelOrigDst))
	}
	b, o = labelStart(b, LabelProto)
	b = appendProto(b, f.Proto)
	labelEnd(b, o, len(LabelProto))
	if port && !f.PortIsDst {
		b, o = labelStart(b, LabelSport)
		b = strconv.AppendUint(b, uint64(f.Port), 10)
		labelEnd(b, o, len(LabelSport))
	}
	b, o = labelStart(b, LabelSrc)
	b = f.Src.AppendTo(b)
	labelEnd(b, o, len(LabelSrc))
	// The samples, bytes then packets, without timestamps (protobuf omits
	// a zero; the header's applies, and leaving it out saves about a
	// tenth of the compressed bytes): field 2 of 9 bytes, holding
	// Sample.value (field 1, fixed64).
	b = append(b, 0x12, 9, 0x09)
	b = binary.LittleEndian.AppendUint64(b, math.Float64bits(float64(f.Bytes)))
	b = append(b, 0x12, 9, 0x09)
	b = binary.LittleEndian.AppendUint64(b, math.Float64bits(float64(f.Packets)))
	n := len(b) - start
	if n < 0x80 {
		b[start-1] = byte(n)
		return b
	}
	// IPv6 addresses can take a series past 127 bytes: a two-byte length
	// (a series is far below 16 KiB).
	b = append(b, 0)
	copy(b[start+1:], b[start:start+n])
	b[start-1] = byte(n) | 0x80
	b[start] = byte(n >> 7)
	return b
}

// labelStart appends a label's fields up to its value, which the caller
// appends next; labelEnd then fills in the lengths. o is where the value
// starts. Names are short and values below 128 bytes.
func labelStart(b []byte, name string) (_ []byte, o int) {
	b = append(b, 0x0a, 0, 0x0a, byte(len(name)))
	b = append(b, name...)
	b = append(b, 0x12, 0)
	return b, len(b)
}

func labelEnd(b []byte, o, nameLen int) {
	n := len(b) - o
	b[o-1] = byte(n)
	b[o-nameLen-5] = byte(4 + nameLen + n)
}

// appendProto appends flow.ProtoName(p) without a string for the others.
func appendProto(b []byte, p uint8) []byte {
	switch p {
	case 1, 6, 17, 58, 132:
		return append(b, flow.ProtoName(p)...)
	}
	return strconv.AppendUint(b, uint64(p), 10)
}
