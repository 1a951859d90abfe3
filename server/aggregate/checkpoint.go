package aggregate

import (
	"encoding/binary"
	"fmt"
	"io"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/server/series"
)

// checkpointVersion is the first field of a checkpoint body. Restore
// also reads version 2, whose label table held strings rather than
// labels.
const (
	checkpointVersion   = 3
	checkpointVersionV2 = 2
)

// maxSlots bounds the series slots a checkpoint body may claim. Free
// slots cost nothing in a body, so the count is all Restore has to size
// the slice by: a corrupt count must not make it allocate without bound
// (2^32 slots are hundreds of GiB: the server would crash at every start
// instead of skipping the checkpoint). An aggregator has at most as many
// slots as it ever had live series, and 2^26 series are tens of GiB of
// labels, beyond any server; refs also stay below noRef.
const maxSlots = 1 << 26

// Snapshot is the aggregator's series at one instant, copied a chunk of
// series at a time under its lock (a series.View: a chunk not copied yet
// is copied before ingest changes it) and written out without it, so a
// checkpoint holds ingest up only for one chunk's copy of counters at a
// time. It is written once: WriteTo ends its hold on the store, and so
// does Release without writing.
type Snapshot struct {
	a         *Aggregator
	store     *series.Store // the one viewed (Restore may replace a's)
	view      *series.View
	delivered int64
}

// Release ends the snapshot's hold on the store's records; WriteTo calls
// it. Calling it again does nothing.
func (s *Snapshot) Release() {
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	s.store.Unpin(s.view)
}

// Len returns the number of live series in the snapshot.
func (s *Snapshot) Len() int { return s.view.Len() }

// Snapshot copies the series. under, if not nil, runs while the lock is
// held where the copy starts: the place to cut the journal, so that the
// snapshot holds exactly the records before the cut.
func (a *Aggregator) Snapshot(under func()) *Snapshot {
	a.walk.Lock()
	defer a.walk.Unlock()
	a.mu.Lock()
	if under != nil {
		under()
	}
	snap := &Snapshot{a: a, store: a.store, view: a.store.StartView(), delivered: a.delivered}
	a.mu.Unlock()
	snap.view.Fill(snap.store, &a.mu)
	return snap
}

// WriteTo writes the snapshot as a checkpoint body: a table of the
// store's symbols (each distinct label once: a pod's name is in every
// pair it is part of), then each live series as its ref, kind, times,
// counters and table indices. It is the store written out as it is held,
// so a checkpoint of a million series costs no lookup per label. The
// table lists the symbols in the order the series first name them, which
// makes the body a function of the series alone (not of the order the
// store interned them in): equal states write equal bytes.
func (s *Snapshot) WriteTo(w io.Writer) (int64, error) {
	defer s.Release()
	all := s.view.Symbols()
	index := make([]uint32, len(all)) // symbol -> table position + 1
	var syms []metrics.Label
	s.view.Each(func(sr *series.Series) {
		for _, id := range sr.Symbols {
			if index[id] == 0 {
				syms = append(syms, all[id])
				index[id] = uint32(len(syms))
			}
		}
	})
	// Written in chunks of about 64 KiB: no buffering needed on top.
	cw := &countWriter{w: w}
	var b []byte
	b = binary.AppendUvarint(b, checkpointVersion)
	b = binary.AppendVarint(b, s.delivered)
	b = binary.AppendUvarint(b, uint64(s.view.Slots()))
	b = binary.AppendUvarint(b, uint64(len(syms)))
	for _, l := range syms {
		b = appendString(b, l.Name)
		b = appendString(b, l.Value)
		if len(b) > 64<<10 {
			if _, err := cw.Write(b); err != nil {
				return cw.n, err
			}
			b = b[:0]
		}
	}
	b = binary.AppendUvarint(b, uint64(s.view.Len()))
	var werr error
	s.view.Each(func(sr *series.Series) {
		if werr != nil {
			return
		}
		b = binary.AppendUvarint(b, uint64(sr.Ref))
		b = append(b, byte(sr.Kind))
		b = binary.AppendVarint(b, sr.Created)
		b = binary.AppendVarint(b, sr.Last)
		b = binary.AppendVarint(b, sr.Pushed)
		b = binary.AppendUvarint(b, sr.Bytes)
		b = binary.AppendUvarint(b, sr.Packets)
		b = binary.AppendUvarint(b, uint64(len(sr.Symbols)))
		for _, id := range sr.Symbols {
			b = binary.AppendUvarint(b, uint64(index[id]-1))
		}
		if len(b) > 64<<10 {
			_, werr = cw.Write(b)
			b = b[:0]
		}
	})
	if werr != nil {
		return cw.n, werr
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
	version := r.uvarint()
	if r.err == nil && version != checkpointVersion && version != checkpointVersionV2 {
		return fmt.Errorf("%w: checkpoint version %d, want %d or %d", errRecord, version, checkpointVersion, checkpointVersionV2)
	}
	delivered := r.varint()
	slots := r.uvarint()
	if r.err == nil && slots > maxSlots {
		r.fail("%d series slots, at most %d", slots, maxSlots)
	}
	// The table: labels (version 3) or strings (version 2), one label
	// being two strings there.
	ns := r.count(1)
	var syms []metrics.Label
	var strs []string
	if version == checkpointVersion {
		syms = make([]metrics.Label, 0, ns)
		for range ns {
			syms = append(syms, metrics.Label{Name: r.string(), Value: r.string()})
		}
	} else {
		strs = make([]string, 0, ns)
		for range ns {
			strs = append(strs, r.string())
		}
	}
	nl := r.count(8)
	if r.err != nil {
		return fmt.Errorf("checkpoint: %w", r.err)
	}
	if uint64(nl) > slots {
		return fmt.Errorf("checkpoint: %w: %d live series in %d slots", errRecord, nl, slots)
	}
	// Build into a fresh store, then swap.
	fresh := series.New()
	var unpushed []uint32
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
	label := func() metrics.Label {
		if version == checkpointVersionV2 {
			return metrics.Label{Name: str(), Value: str()}
		}
		i := r.uvarint()
		if r.err != nil {
			return metrics.Label{}
		}
		if i >= uint64(len(syms)) {
			r.fail("label index %d out of range", i)
			return metrics.Label{}
		}
		return syms[i]
	}
	for range nl {
		ref := r.ref(int(slots))
		kind := seriesKind(r.byte())
		created, last, pushed := r.varint(), r.varint(), r.varint()
		bytes, packets := r.uvarint(), r.uvarint()
		n := r.count(1)
		if r.err != nil {
			break
		}
		lab := make([]metrics.Label, n)
		for i := range lab {
			lab[i] = label()
		}
		if r.err != nil {
			break
		}
		if fresh.Kind(ref) != kindFree {
			r.fail("series ref %d twice", ref)
			break
		}
		if err := validLabels(kind, lab); err != nil {
			r.err = err
			break
		}
		h := fresh.Hash(lab)
		if _, dup := fresh.LookupHashed(lab, h); dup {
			r.fail("series twice: %v", lab)
			break
		}
		fresh.Install(ref, kind, lab, packetsName(kind, lab), created, h)
		fresh.Restore(ref, bytes, packets, last, pushed)
		if pushed == 0 {
			unpushed = append(unpushed, ref)
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
	fresh.Grow(int(slots))
	fresh.Rebuild()
	a.store = fresh
	a.delivered = delivered
	a.unpushed = unpushed
	clear(a.routes)
	clear(a.svcRoutes)
	return nil
}
