package aggregate

import (
	"encoding/binary"
	"fmt"
	"io"
	"slices"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
)

// checkpointVersion is the first field of a checkpoint body.
const checkpointVersion = 2

// maxSlots bounds the series slots a checkpoint body may claim. Free
// slots cost nothing in a body, so the count is all Restore has to size
// the slice by: a corrupt count must not make it allocate without bound
// (2^32 slots are hundreds of GiB: the server would crash at every start
// instead of skipping the checkpoint). An aggregator has at most as many
// slots as it ever had live series, and 2^26 series are tens of GiB of
// labels, beyond any server; refs also stay below noRef.
const maxSlots = 1 << 26

// Snapshot is a copy of the aggregator's series, taken under its lock and
// written out without it, so a checkpoint holds ingest up only for a copy.
// Label slices are shared, not copied: they never change.
type Snapshot struct {
	series    []series
	delivered int64
}

// Len returns the number of live series in the snapshot.
func (s *Snapshot) Len() int {
	n := 0
	for i := range s.series {
		if s.series[i].kind != kindFree {
			n++
		}
	}
	return n
}

// Snapshot copies the series. under, if not nil, runs while the lock is
// held: the place to cut the journal, so that the snapshot holds exactly
// the records before the cut.
func (a *Aggregator) Snapshot(under func()) *Snapshot {
	a.mu.Lock()
	defer a.mu.Unlock()
	if under != nil {
		under()
	}
	return &Snapshot{series: slices.Clone(a.series), delivered: a.delivered}
}

// WriteTo writes the snapshot as a checkpoint body: a table of the
// distinct label strings (names and values repeat across series: a pod's
// name is in every pair it is part of), then each live series as its ref,
// kind, times, counters and string indices.
func (s *Snapshot) WriteTo(w io.Writer) (int64, error) {
	idx := map[string]uint32{}
	var strs []string
	intern := func(v string) {
		if _, ok := idx[v]; !ok {
			idx[v] = uint32(len(strs))
			strs = append(strs, v)
		}
	}
	live := 0
	for i := range s.series {
		sr := &s.series[i]
		if sr.kind == kindFree {
			continue
		}
		live++
		for _, l := range sr.lab {
			intern(l.Name)
			intern(l.Value)
		}
	}
	// Written in chunks of about 64 KiB: no buffering needed on top.
	cw := &countWriter{w: w}
	var b []byte
	b = binary.AppendUvarint(b, checkpointVersion)
	b = binary.AppendVarint(b, s.delivered)
	b = binary.AppendUvarint(b, uint64(len(s.series)))
	b = binary.AppendUvarint(b, uint64(len(strs)))
	for _, v := range strs {
		b = appendString(b, v)
		if len(b) > 64<<10 {
			if _, err := cw.Write(b); err != nil {
				return cw.n, err
			}
			b = b[:0]
		}
	}
	b = binary.AppendUvarint(b, uint64(live))
	for i := range s.series {
		sr := &s.series[i]
		if sr.kind == kindFree {
			continue
		}
		b = binary.AppendUvarint(b, uint64(i))
		b = append(b, byte(sr.kind))
		b = binary.AppendVarint(b, sr.created)
		b = binary.AppendVarint(b, sr.last)
		b = binary.AppendVarint(b, sr.pushed)
		b = binary.AppendUvarint(b, sr.bytes)
		b = binary.AppendUvarint(b, sr.packets)
		b = binary.AppendUvarint(b, uint64(len(sr.lab)))
		for _, l := range sr.lab {
			b = binary.AppendUvarint(b, uint64(idx[l.Name]))
			b = binary.AppendUvarint(b, uint64(idx[l.Value]))
		}
		if len(b) > 64<<10 {
			if _, err := cw.Write(b); err != nil {
				return cw.n, err
			}
			b = b[:0]
		}
	}
	if _, err := cw.Write(b); err != nil {
		return cw.n, err
	}
	return cw.n, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Restore replaces the aggregator's series with a checkpoint body's. It is
// all or nothing: a body that does not decode whole, or is inconsistent
// (a ref twice, labels of the wrong kind, a series twice), leaves the
// aggregator as it was and returns an error. Call FinishReplay after the
// journal's replay.
func (a *Aggregator) Restore(body []byte) error {
	r := &reader{b: body}
	if v := r.uvarint(); r.err == nil && v != checkpointVersion {
		return fmt.Errorf("%w: checkpoint version %d, want %d", errRecord, v, checkpointVersion)
	}
	delivered := r.varint()
	slots := r.uvarint()
	if r.err == nil && slots > maxSlots {
		r.fail("%d series slots, at most %d", slots, maxSlots)
	}
	ns := r.count(1)
	strs := make([]string, 0, ns)
	for range ns {
		strs = append(strs, r.string())
	}
	nl := r.count(8)
	if r.err != nil {
		return fmt.Errorf("checkpoint: %w", r.err)
	}
	if uint64(nl) > slots {
		return fmt.Errorf("checkpoint: %w: %d live series in %d slots", errRecord, nl, slots)
	}
	// Build into a fresh aggregator state, then swap.
	fresh := &Aggregator{cfg: a.cfg, seed: a.seed,
		byHash: map[uint64]uint32{}, collided: map[uint64][]uint32{}, routes: map[routeKey]route{},
		folded: a.folded, expired: a.expired}
	fresh.series = make([]series, slots)
	str := func() string {
		i := r.uvarint()
		if r.err != nil {
			return ""
		}
		if i >= uint64(len(strs)) {
			r.fail("string index %d out of range", i)
			return ""
		}
		return strs[i]
	}
	for range nl {
		ref := r.ref(int(slots))
		kind := seriesKind(r.byte())
		created, last, pushed := r.varint(), r.varint(), r.varint()
		bytes, packets := r.uvarint(), r.uvarint()
		n := r.count(2)
		if r.err != nil {
			break
		}
		lab := make([]metrics.Label, n)
		for i := range lab {
			lab[i] = metrics.Label{Name: str(), Value: str()}
		}
		if r.err != nil {
			break
		}
		if fresh.series[ref].kind != kindFree {
			r.fail("series ref %d twice", ref)
			break
		}
		if err := validLabels(kind, lab); err != nil {
			r.err = err
			break
		}
		h := fresh.hash(lab)
		if _, dup := fresh.lookupHashed(lab, h); dup {
			r.fail("series twice: %v", lab)
			break
		}
		fresh.installHashed(ref, kind, lab, created, h)
		s := &fresh.series[ref]
		s.last, s.bytes, s.packets, s.pushed = last, bytes, packets, pushed
		s.restored = true
		if pushed == 0 {
			fresh.unpushed = append(fresh.unpushed, ref)
		}
	}
	if r.err == nil && len(r.b) > 0 {
		r.fail("%d trailing bytes", len(r.b))
	}
	if r.err != nil {
		return fmt.Errorf("checkpoint: %w", r.err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.live.Add(-a.live.Load() + fresh.live.Load())
	a.series, a.byHash, a.collided, a.podPairs = fresh.series, fresh.byHash, fresh.collided, fresh.podPairs
	a.delivered = delivered
	a.unpushed = fresh.unpushed
	a.free = a.free[:0]
	clear(a.routes)
	return nil
}
