package wire

import (
	"cmp"
	"encoding/binary"
	"math"
	"math/bits"
	"net/netip"
	"runtime"
	"slices"
	"strconv"
	"sync"

	"github.com/golang/snappy"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
)

// Encoder turns batches into compressed request bodies. It keeps its
// buffers between calls, so steady-state encoding allocates nothing; it is
// not safe for concurrent use.
//
// A large batch is encoded and compressed in parts, one goroutine each (up
// to GOMAXPROCS, at most maxParts), and the parts' snappy output joined
// into one block: snappy's copies point back within what is already
// written, so the elements of independently compressed parts decode, one
// after the other, to the parts' concatenation. Only the length prefix is
// rewritten. snappy.Encode works in independent 64 KiB blocks anyway, so
// parts cost no compression.
type Encoder struct {
	sb      remotewrite.SeriesBuilder
	scratch []byte
	tail    []byte
	parts   []part
	out     []byte
	// nparts fixes the number of parts (tests); 0 lets Encode choose.
	nparts int
}

// part is one goroutine's share of a batch: its blocks of flows, encoded
// and then compressed.
type part struct {
	raw   []byte
	comp  []byte
	order []orderKey
	tmp   []orderKey
}

// maxParts bounds the goroutines one Encode uses: two already bring a
// flush of 100,000 flows well within its time budget, and an agent should
// not take every core of a busy node for a moment.
const maxParts = 4

// orderKey places flows with the same source and nearby destinations next
// to each other, which is what lets snappy find repeated label bytes; the
// order is not part of the contract. One integer keeps sorting a flush
// cheap: it allows a radix sort (see sortOrder; EncodeFlush in
// BENCHMARKS.md).
type orderKey struct {
	k uint64
	i int32
}

func keyOf(f *flow.Record) uint64 {
	s, d := f.Src.As16(), f.Dst.As16()
	return uint64(s[12])<<56 | uint64(s[13])<<48 | uint64(s[14])<<40 | uint64(s[15])<<32 |
		uint64(d[12])<<24 | uint64(d[13])<<16 | uint64(d[14])<<8 | uint64(d[15])
}

// sortOrder sorts p.order by key: a least significant digit radix sort,
// a byte per pass, skipping the bytes all keys share. It returns the sorted
// slice (p.order or p.tmp).
func (p *part) sortOrder() []orderKey {
	a := p.order
	if len(a) < 256 {
		slices.SortFunc(a, func(x, y orderKey) int { return cmp.Compare(x.k, y.k) })
		return a
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
	p.tmp = slices.Grow(p.tmp[:0], len(a))[:len(a)]
	src, dst := a, p.tmp
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
	return src
}

// sortBlock is the number of flows ordered together (see Encode).
const sortBlock = 4096

// Encode returns the snappy-compressed WriteRequest for b. The returned
// slice is owned by the encoder and valid until the next call.
func (e *Encoder) Encode(b *Batch) []byte {
	ts := b.Time.UnixMilli()
	blocks := (len(b.Flows) + sortBlock - 1) / sortBlock
	n := e.nparts
	if n <= 0 {
		n = min(runtime.GOMAXPROCS(0), maxParts)
	}
	n = max(min(n, blocks), 1)
	if len(e.parts) < n {
		e.parts = append(e.parts, make([]part, n-len(e.parts))...)
	}
	parts := e.parts[:n]

	// The header opens the first part, the agent's own metrics close the
	// last; both are written here, before the parts start.
	p0 := &parts[0]
	// An IPv4 flow takes about 125 bytes: grow once, not by doubling.
	p0.raw = slices.Grow(p0.raw[:0], 256+128*len(b.Flows)/n)
	e.sb.Reset()
	e.sb.Label(LabelName, MetricBatch)
	e.sb.Label(LabelIncarnation, b.Incarnation)
	e.sb.Label(LabelNode, b.Node)
	e.scratch = strconv.AppendUint(e.scratch[:0], b.Seq, 10)
	e.sb.LabelBytes(LabelSeq, e.scratch)
	e.sb.Sample(float64(len(b.Flows)), ts)
	p0.raw = e.sb.AppendTo(p0.raw)
	e.tail = e.tail[:0]
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
		e.tail = e.sb.AppendTo(e.tail)
	}

	// Part i takes blocks [i*blocks/n, (i+1)*blocks/n); part 0 runs on
	// this goroutine, last.
	var wg sync.WaitGroup
	for i := n - 1; i >= 0; i-- {
		p := &parts[i]
		if i > 0 {
			p.raw = slices.Grow(p.raw[:0], 128*len(b.Flows)/n)
		}
		lo := min(i*blocks/n*sortBlock, len(b.Flows))
		hi := min((i+1)*blocks/n*sortBlock, len(b.Flows))
		var tail []byte
		if i == n-1 {
			tail = e.tail
		}
		if i == 0 {
			p.encode(b.Flows[lo:hi], tail)
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.encode(b.Flows[lo:hi], tail)
		}()
	}
	wg.Wait()
	if n == 1 {
		return parts[0].comp
	}
	total := 0
	for i := range parts {
		total += len(parts[i].raw)
	}
	e.out = binary.AppendUvarint(e.out[:0], uint64(total))
	for i := range parts {
		_, hdr := binary.Uvarint(parts[i].comp)
		e.out = append(e.out, parts[i].comp[hdr:]...)
	}
	return e.out
}

// encode appends the flows to p.raw (which may hold the header already),
// then tail, and compresses the result into p.comp.
//
// Flows are ordered within blocks, not across the whole batch: snappy
// only finds repeats within the last 64 KiB (some 600 flows), so a block
// of sortBlock flows holds nearly all the repeats a full sort would bring
// together, and its records (~300 KB) stay in the CPU's cache while they
// are read in key order; a full sort read 100,000 records at random, a
// cache miss each.
func (p *part) encode(flows []flow.Record, tail []byte) {
	for start := 0; start < len(flows); start += sortBlock {
		block := flows[start:min(start+sortBlock, len(flows))]
		p.order = slices.Grow(p.order[:0], len(block))
		for i := range block {
			p.order = append(p.order, orderKey{k: keyOf(&block[i]), i: int32(i)})
		}
		for _, o := range p.sortOrder() {
			p.raw = appendFlow(p.raw, &block[o.i])
		}
	}
	p.raw = append(p.raw, tail...)
	// Grow the output with headroom: snappy allocates whenever the
	// destination is a byte short, and batch sizes wobble.
	if need := snappy.MaxEncodedLen(len(p.raw)); cap(p.comp) < need {
		p.comp = make([]byte, need+need/8)
	}
	p.comp = snappy.Encode(p.comp[:cap(p.comp)], p.raw)
}

// hasPort reports whether a flow's series carries a port label: always
// for the protocols with ports, and for any other that has a port.
func hasPort(proto uint8, port uint16) bool {
	return port != 0 || proto == 6 || proto == 17 || proto == 132
}

// appendFlow appends a flow's series (a WriteRequest.timeseries field) to
// b. It writes the protobuf directly: every length but the series' own is
// below 128, so one byte, patched once the value is in place. This is the
// agent's hottest loop with the compression, hence no builder and no
// scratch buffers.
func appendFlow(b []byte, f *flow.Record) []byte {
	b = append(b, 0x0a, 0) // WriteRequest.timeseries, length patched below
	start := len(b)
	b = append(b, flowName...)
	port := hasPort(f.Proto, f.Port)
	var o int
	if port && f.PortIsDst {
		b, o = labelStart(b, LabelDport)
		b = appendPort(b, f.Port)
		labelEnd(b, o, len(LabelDport))
	}
	b, o = labelStart(b, LabelDst)
	b = appendAddr(b, f.Dst)
	labelEnd(b, o, len(LabelDst))
	if f.OrigDst.IsValid() {
		b, o = labelStart(b, LabelOrigDst)
		b = appendAddrPort(b, f.OrigDst)
		labelEnd(b, o, len(LabelOrigDst))
	}
	b, o = labelStart(b, LabelProto)
	b = appendProto(b, f.Proto)
	labelEnd(b, o, len(LabelProto))
	if port && !f.PortIsDst {
		b, o = labelStart(b, LabelSport)
		b = appendPort(b, f.Port)
		labelEnd(b, o, len(LabelSport))
	}
	b, o = labelStart(b, LabelSrc)
	b = appendAddr(b, f.Src)
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

// appendPort appends p in decimal.
func appendPort(b []byte, p uint16) []byte {
	switch {
	case p >= 10000:
		return append(b, byte('0'+p/10000), byte('0'+p/1000%10), byte('0'+p/100%10), byte('0'+p/10%10), byte('0'+p%10))
	case p >= 1000:
		return append(b, byte('0'+p/1000), byte('0'+p/100%10), byte('0'+p/10%10), byte('0'+p%10))
	case p >= 100:
		return append(b, byte('0'+p/100), byte('0'+p/10%10), byte('0'+p%10))
	case p >= 10:
		return append(b, byte('0'+p/10), byte('0'+p%10))
	}
	return append(b, byte('0'+p))
}

// appendAddr formats a exactly as netip.Addr.AppendTo does (RFC 5952 for
// IPv6), without its generic paths.
func appendAddr(b []byte, a netip.Addr) []byte {
	if !a.Is4() {
		if a.Is4In6() || a.Zone() != "" || !a.Is6() {
			return a.AppendTo(b)
		}
		return appendIPv6(b, a.As16())
	}
	return appendIPv4(b, a.As4())
}

// appendAddrPort formats p exactly as netip.AddrPort.AppendTo does: an
// IPv6 address (IPv4-mapped ones too) in brackets.
func appendAddrPort(b []byte, p netip.AddrPort) []byte {
	a := p.Addr()
	if a.Is4() {
		b = appendAddr(b, a)
	} else {
		b = append(b, '[')
		b = appendAddr(b, a)
		b = append(b, ']')
	}
	b = append(b, ':')
	return appendPort(b, p.Port())
}

// decimals holds, per byte value, its decimal digits followed by a dot in
// the low four bytes, and their count (dot included) above.
var decimals = func() (t [256]uint64) {
	for v := range t {
		d := strconv.Itoa(v) + "."
		for i := range len(d) {
			t[v] |= uint64(d[i]) << (8 * i)
		}
		t[v] |= uint64(len(d)) << 32
	}
	return t
}()

// appendIPv4 formats a dotted quad in a local buffer, a word per number.
func appendIPv4(b []byte, v [4]byte) []byte {
	var buf [16]byte
	n := 0
	for _, x := range v {
		d := decimals[x]
		binary.LittleEndian.PutUint32(buf[n:], uint32(d))
		n += int(d >> 32)
	}
	return append(b, buf[:n-1]...) // without the last dot
}

// appendIPv6 formats as netip's appendTo6 does: lowercase hex groups
// without leading zeros, the longest run of two or more zero groups (the
// first of equals) as "::"; in a local buffer, a word per group.
func appendIPv6(b []byte, s [16]byte) []byte {
	var g [8]uint16
	var zero uint8 // bit i: group i is zero
	for i := range g {
		g[i] = binary.BigEndian.Uint16(s[2*i:])
		if g[i] == 0 {
			zero |= 1 << i
		}
	}
	r := zeroRuns[zero]
	zs, ze := int(r&0xf), int(r>>4)
	var buf [48]byte
	n := 0
	for i := 0; i < 8; i++ {
		if i == zs {
			buf[n], buf[n+1] = ':', ':'
			n += 2
			i = ze
			if i >= 8 {
				break
			}
		} else if i > 0 {
			buf[n] = ':'
			n++
		}
		x := g[i]
		l := 4 - min(bits.LeadingZeros16(x)/4, 3)
		w := uint32(hex2[x>>8]) | uint32(hex2[x&0xff])<<16
		binary.LittleEndian.PutUint32(buf[n:], w>>(8*(4-l)))
		n += l
	}
	return append(b, buf[:n]...)
}

// hex2 holds the two lowercase hex digits of each byte, the first in the
// low byte.
var hex2 = func() (t [256]uint16) {
	const digits = "0123456789abcdef"
	for v := range t {
		t[v] = uint16(digits[v>>4]) | uint16(digits[v&0xf])<<8
	}
	return t
}()

// zeroRuns holds, for each mask of an address's zero groups, the longest
// run of two or more of them (the first of equals) as start | end<<4, or
// start = end = 8 for none.
var zeroRuns = func() (t [256]uint8) {
	for m := range t {
		zs, ze, best := 8, 8, 1
		for i := 0; i < 8; {
			if m>>i&1 == 0 {
				i++
				continue
			}
			j := i + 1
			for j < 8 && m>>j&1 != 0 {
				j++
			}
			if j-i > best {
				zs, ze, best = i, j, j-i
			}
			i = j
		}
		t[m] = uint8(zs | ze<<4)
	}
	return t
}()

// appendProto appends flow.ProtoName(p) without a string for the others.
func appendProto(b []byte, p uint8) []byte {
	switch p {
	case 1, 6, 17, 58, 132:
		return append(b, flow.ProtoName(p)...)
	}
	return strconv.AppendUint(b, uint64(p), 10)
}
