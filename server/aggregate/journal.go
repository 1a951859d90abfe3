package aggregate

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/server/series"
)

// Journal keeps the aggregator's changes durable (server/state's log).
// Append is called under the aggregator's lock, in the order the changes
// were made, with a record the journal now owns and, for an agent batch,
// its id; it must only queue, and returns the position to wait on.
//
// Wait blocks until the record at a position is durable (or writing
// failed): a push waits for its record of first pushes before any of its
// requests leave, so that after a crash a series the log says was never
// pushed is new to every receiver for certain.
type Journal interface {
	Append(rec []byte, id *BatchID) uint64
	Wait(ctx context.Context, pos uint64) error
}

// BatchID identifies an agent batch (the wire contract's exactly-once
// key). It is recorded with the batch's effect so that a restart restores
// which batches were applied along with what they added.
type BatchID struct {
	Node, Incarnation string
	Seq               uint64
}

// Record types. A record is a type byte and its fields as varints and
// length-prefixed strings:
//
//	batch:     id? (0|1, node, incarnation, seq), receive time (ns),
//	           declarations (ref, kind, created ms, labels),
//	           flows (zone ref, pair ref+1, cross ref+1, service ref+1,
//	           bytes, packets)
//	expire:    time (ns), refs
//	delivered: push stamp (ms)
//	pushed:    push stamp (ms): the series declared before it, not
//	           pushed yet, were first pushed then
//
// A flow names refs rather than labels, and a series' labels are written
// once, by the batch that created it: a batch of known pairs costs a few
// bytes per flow. recBatchNoService is the batch record without the
// service ref, which logs written by servers without Service series hold;
// it still replays.
const (
	recBatchNoService byte = 1
	recExpire         byte = 2
	recDelivered      byte = 3
	recPushed         byte = 4
	recBatch          byte = 5
)

// errRecord wraps every reason a record is refused at replay.
var errRecord = errors.New("invalid state record")

// beginBatch starts the record of a batch of n flows.
func (a *Aggregator) beginBatch(n int) {
	a.declared = a.declared[:0]
	a.rec = a.rec[:0]
	a.rec = binary.AppendUvarint(a.rec, uint64(n))
}

// recordFlow appends one flow's route and counts to the batch record.
func (a *Aggregator) recordFlow(r route, c flow.Counts) {
	a.rec = binary.AppendUvarint(a.rec, uint64(r.zone))
	a.rec = binary.AppendUvarint(a.rec, uint64(r.pair+1)) // noRef+1 == 0
	a.rec = binary.AppendUvarint(a.rec, uint64(r.cross+1))
	a.rec = binary.AppendUvarint(a.rec, uint64(r.svc+1))
	a.rec = binary.AppendUvarint(a.rec, c.Bytes)
	a.rec = binary.AppendUvarint(a.rec, c.Packets)
}

// endBatch assembles the record (header, the series this batch created,
// its flows) and hands it to the journal.
func (a *Aggregator) endBatch(id *BatchID, now time.Time) uint64 {
	size := 64 + len(a.rec)
	for _, ref := range a.declared {
		size += 16
		a.store.Get(ref, &a.decl)
		for _, l := range a.decl.Labels {
			size += 4 + len(l.Name) + len(l.Value)
		}
	}
	b := make([]byte, 0, size)
	b = append(b, recBatch)
	if id != nil {
		b = append(b, 1)
		b = appendString(b, id.Node)
		b = appendString(b, id.Incarnation)
		b = binary.AppendUvarint(b, id.Seq)
	} else {
		b = append(b, 0)
	}
	b = binary.AppendVarint(b, now.UnixNano())
	b = binary.AppendUvarint(b, uint64(len(a.declared)))
	for _, ref := range a.declared {
		s := &a.decl
		a.store.Get(ref, s)
		b = binary.AppendUvarint(b, uint64(ref))
		b = append(b, byte(s.Kind))
		b = binary.AppendVarint(b, s.Created)
		b = appendLabels(b, s.Labels)
	}
	b = append(b, a.rec...)
	a.declared = a.declared[:0]
	return a.cfg.Journal.Append(b, id)
}

func appendExpire(b []byte, now time.Time, refs []uint32) []byte {
	b = append(b, recExpire)
	b = binary.AppendVarint(b, now.UnixNano())
	b = binary.AppendUvarint(b, uint64(len(refs)))
	for _, r := range refs {
		b = binary.AppendUvarint(b, uint64(r))
	}
	return b
}

func appendPushed(b []byte, ts int64) []byte {
	b = append(b, recPushed)
	return binary.AppendVarint(b, ts)
}

func appendDelivered(b []byte, ts int64) []byte {
	b = append(b, recDelivered)
	return binary.AppendVarint(b, ts)
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendLabels(b []byte, ls []metrics.Label) []byte {
	b = binary.AppendUvarint(b, uint64(len(ls)))
	for _, l := range ls {
		b = appendString(b, l.Name)
		b = appendString(b, l.Value)
	}
	return b
}

// reader decodes a record; the first error sticks.
type reader struct {
	b   []byte
	err error
	// intern, when set, returns one string per distinct label string:
	// replaying a log of a million series declarations would otherwise
	// allocate each pod name once per pair it is part of.
	intern map[string]string
}

func (r *reader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: %s", errRecord, fmt.Sprintf(format, args...))
	}
}

func (r *reader) byte() byte {
	if r.err != nil || len(r.b) == 0 {
		r.fail("truncated")
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func (r *reader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail("bad varint")
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) varint() int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.fail("bad varint")
		return 0
	}
	r.b = r.b[n:]
	return v
}

// count reads a length and checks that at least min bytes per element
// remain, so a corrupt length cannot make the reader allocate for it.
func (r *reader) count(min int) int {
	n := r.uvarint()
	if r.err == nil && n > uint64(len(r.b)/min) {
		r.fail("count %d exceeds the record", n)
		return 0
	}
	return int(n)
}

func (r *reader) string() string {
	n := r.uvarint()
	if r.err != nil {
		return ""
	}
	if n > uint64(len(r.b)) {
		r.fail("string of %d bytes exceeds the record", n)
		return ""
	}
	raw := r.b[:n]
	r.b = r.b[n:]
	if r.intern == nil {
		return string(raw)
	}
	if s, ok := r.intern[string(raw)]; ok {
		return s
	}
	s := string(raw)
	r.intern[s] = s
	return s
}

// optRef reads a ref written plus one, 0 meaning none (noRef).
func (r *reader) optRef(limit int) uint32 {
	v := r.uvarint()
	if v == 0 {
		return noRef
	}
	if r.err == nil && v > uint64(limit) {
		r.fail("series ref %d out of range", v-1)
		return noRef
	}
	return uint32(v - 1)
}

func (r *reader) ref(limit int) uint32 {
	v := r.uvarint()
	if r.err == nil && v >= uint64(limit) {
		r.fail("series ref %d out of range", v)
		return 0
	}
	return uint32(v)
}

func (r *reader) labels() []metrics.Label {
	n := r.count(2)
	if r.err != nil {
		return nil
	}
	ls := make([]metrics.Label, n)
	for i := range ls {
		ls[i] = metrics.Label{Name: r.string(), Value: r.string()}
	}
	return ls
}

// validLabels checks what install relies on: __name__ first, naming a
// series of kind.
func validLabels(kind seriesKind, ls []metrics.Label) error {
	if len(ls) == 0 || ls[0].Name != "__name__" {
		return fmt.Errorf("%w: series without __name__", errRecord)
	}
	if len(ls) > series.MaxLabels {
		return fmt.Errorf("%w: %d labels, at most %d", errRecord, len(ls), series.MaxLabels)
	}
	for _, l := range ls {
		if l.Value == "" {
			return fmt.Errorf("%w: label %q without a value", errRecord, l.Name)
		}
	}
	var want []string
	switch kind {
	case kindPair, kindOverflow, kindHostPair:
		want = []string{MetricPodPairBytes}
	case kindZone:
		want = []string{MetricZonePairBytes}
	case kindCross:
		want = []string{MetricPodCrossZone}
	case kindService, kindServiceFolded:
		want = []string{MetricServiceBytes}
	default:
		return fmt.Errorf("%w: series kind %d", errRecord, kind)
	}
	if !slices.Contains(want, ls[0].Value) {
		return fmt.Errorf("%w: series %q of kind %d", errRecord, ls[0].Value, kind)
	}
	for i := 1; i < len(ls); i++ {
		if ls[i].Name <= ls[i-1].Name {
			return fmt.Errorf("%w: labels not sorted", errRecord)
		}
	}
	return nil
}

// decl is a series declaration of a batch record.
type decl struct {
	ref     uint32
	kind    seriesKind
	created int64
	lab     []metrics.Label
	hash    uint64
}

// Replay applies one journal record, as read back from the log after a
// restart, and returns the agent batch it was (nil for other records).
// A record is checked whole before anything of it is applied: one that
// does not decode, or names series that do not exist, is refused with an
// error and changes nothing.
func (a *Aggregator) Replay(rec []byte) (*BatchID, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.replayStrings == nil {
		a.replayStrings = map[string]string{}
	}
	r := &reader{b: rec, intern: a.replayStrings}
	switch typ := r.byte(); typ {
	case recBatch:
		return a.replayBatch(r, true)
	case recBatchNoService:
		return a.replayBatch(r, false)
	case recExpire:
		now := r.varint()
		n := r.count(1)
		refs := make([]uint32, 0, n)
		for range n {
			ref := r.ref(a.store.Slots())
			if r.err == nil && a.store.Kind(ref) == kindFree {
				r.fail("expiry of free series ref %d", ref)
			}
			refs = append(refs, ref)
		}
		if r.err == nil && len(r.b) > 0 {
			r.fail("%d trailing bytes", len(r.b))
		}
		if r.err != nil {
			return nil, r.err
		}
		_ = now
		for _, ref := range refs {
			a.store.Remove(ref) // listed twice: once is enough
		}
		a.expired.Add(float64(len(refs)))
		return nil, nil
	case recPushed:
		ts := r.varint()
		if r.err == nil && len(r.b) > 0 {
			r.fail("%d trailing bytes", len(r.b))
		}
		if r.err == nil && ts <= 0 {
			r.fail("push stamp %d", ts)
		}
		if r.err != nil {
			return nil, r.err
		}
		for _, ref := range a.unpushed {
			a.store.SetPushed(ref, ts)
		}
		a.unpushed = a.unpushed[:0]
		return nil, nil
	case recDelivered:
		ts := r.varint()
		if r.err == nil && len(r.b) > 0 {
			r.fail("%d trailing bytes", len(r.b))
		}
		if r.err != nil {
			return nil, r.err
		}
		a.delivered = max(a.delivered, ts)
		return nil, nil
	default:
		if r.err != nil {
			return nil, r.err
		}
		return nil, fmt.Errorf("%w: unknown record type %d", errRecord, typ)
	}
}

func (a *Aggregator) replayBatch(r *reader, withService bool) (*BatchID, error) {
	var id *BatchID
	switch r.byte() {
	case 0:
	case 1:
		id = &BatchID{Node: r.string(), Incarnation: r.string(), Seq: r.uvarint()}
	default:
		r.fail("bad batch id flag")
	}
	recv := r.varint()
	nd := r.count(4)
	decls := make([]decl, 0, nd)
	limit := a.store.Slots()
	newSlots := map[uint32]seriesKind{}
	// byLabels indexes decls by label hash: two declarations of one
	// series would leave the state with a series twice, which no
	// checkpoint of it could restore.
	var byLabels map[uint64][]int
	if nd > 1 {
		byLabels = make(map[uint64][]int, nd)
	}
	for range nd {
		d := decl{ref: uint32(r.uvarint()), kind: seriesKind(r.byte()), created: r.varint(), lab: r.labels()}
		if r.err != nil {
			break
		}
		// A declaration takes a free slot or the next one past the end.
		switch {
		case a.store.Kind(d.ref) != kindFree:
			r.fail("series ref %d declared while in use", d.ref)
		case int(d.ref) > limit:
			r.fail("series ref %d declared past the end (%d)", d.ref, limit)
		case newSlots[d.ref] != kindFree:
			r.fail("series ref %d declared twice", d.ref)
		}
		if err := validLabels(d.kind, d.lab); err != nil && r.err == nil {
			r.err = err
		}
		d.hash = a.store.Hash(d.lab)
		if _, dup := a.store.LookupHashed(d.lab, d.hash); dup && r.err == nil {
			r.fail("series declared twice: %v", d.lab)
		}
		if r.err != nil {
			break
		}
		if byLabels != nil {
			h := d.hash
			for _, i := range byLabels[h] {
				if slices.Equal(decls[i].lab, d.lab) {
					r.fail("series declared twice in a record: %v", d.lab)
				}
			}
			if r.err != nil {
				break
			}
			byLabels[h] = append(byLabels[h], len(decls))
		}
		if int(d.ref) == limit {
			limit++
		}
		newSlots[d.ref] = d.kind
		decls = append(decls, d)
	}
	kindOf := func(ref uint32) seriesKind {
		if k, ok := newSlots[ref]; ok {
			return k
		}
		return a.store.Kind(ref)
	}
	nf := r.count(5)
	routes := make([]route, 0, nf)
	counts := make([]flow.Counts, 0, nf)
	// A counter must not wrap (a receiver would read a reset): the
	// record's total added to the largest counter it touches must fit.
	var sumBytes, sumPackets, maxBytes, maxPackets uint64
	touch := func(ref uint32) {
		if ref != noRef && a.store.Kind(ref) != kindFree { // new slots: zero
			b, p := a.store.Counts(ref)
			maxBytes, maxPackets = max(maxBytes, b), max(maxPackets, p)
		}
	}
	for range nf {
		rt := route{pairRoute: pairRoute{zone: r.ref(limit), pair: r.optRef(limit), cross: r.optRef(limit)}, svc: noRef}
		if withService {
			rt.svc = r.optRef(limit)
		}
		c := flow.Counts{Bytes: r.uvarint(), Packets: r.uvarint()}
		if r.err != nil {
			break
		}
		if kindOf(rt.zone) != kindZone {
			r.fail("flow to ref %d, not a zone pair", rt.zone)
		}
		if rt.pair != noRef {
			if int(rt.pair) >= limit {
				r.fail("pair ref %d out of range", rt.pair)
			} else if k := kindOf(rt.pair); k != kindPair && k != kindOverflow && k != kindHostPair {
				r.fail("flow to ref %d, not a pod pair", rt.pair)
			}
		}
		if rt.cross != noRef {
			if int(rt.cross) >= limit {
				r.fail("cross ref %d out of range", rt.cross)
			} else if kindOf(rt.cross) != kindCross {
				r.fail("flow to ref %d, not a cross-zone series", rt.cross)
			}
		}
		if rt.svc != noRef {
			if int(rt.svc) >= limit {
				r.fail("service ref %d out of range", rt.svc)
			} else if k := kindOf(rt.svc); k != kindService && k != kindServiceFolded {
				r.fail("flow to ref %d, not a Service series", rt.svc)
			}
		}
		if r.err != nil {
			break
		}
		if sumBytes+c.Bytes < sumBytes || sumPackets+c.Packets < sumPackets {
			r.fail("counts overflow")
			break
		}
		sumBytes += c.Bytes
		sumPackets += c.Packets
		touch(rt.zone)
		touch(rt.pair)
		touch(rt.cross)
		touch(rt.svc)
		routes = append(routes, rt)
		counts = append(counts, c)
	}
	if r.err == nil && (maxBytes+sumBytes < maxBytes || maxPackets+sumPackets < maxPackets) {
		r.fail("counts overflow a counter")
	}
	if r.err == nil && len(r.b) > 0 {
		r.fail("%d trailing bytes", len(r.b))
	}
	if r.err != nil {
		return nil, r.err
	}
	for _, d := range decls {
		a.store.Install(d.ref, d.kind, d.lab, packetsName(d.kind, d.lab), d.created, d.hash)
		a.store.Restore(d.ref, 0, 0, recv, 0)
		a.unpushed = append(a.unpushed, d.ref)
	}
	for i, rt := range routes {
		a.add(rt, counts[i], recv)
	}
	return id, nil
}

// FinishReplay makes the aggregator ready for traffic after Restore and
// Replay: it rebuilds the free list.
func (a *Aggregator) FinishReplay() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.replayStrings = nil
	a.unpushed = nil
	a.store.Rebuild()
	clear(a.routes)
	clear(a.svcRoutes)
}
