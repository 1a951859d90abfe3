package series

import (
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
)

// planned is one series of a capture: its ref and what the snapshot
// sends of it.
type planned struct {
	ref      uint32
	mayExist bool
	bytes    uint64
	packets  uint64
	created  int64 // its zero's stamp, 0 for none
}

// Capture is what a snapshot sends: the values of every live series and
// the stale markers of the expired ones, taken under the owner's lock
// (Store.Capture) and encoded without it (Encode), so that a push of
// millions of series holds ingest up only for a copy of their counters.
//
// Encode reads the records' labels and the symbols without the lock.
// That is safe because neither changes while a capture may be encoded: a
// record's labels are written when it is declared, into a free ref, and
// the refs and symbols a capture reads are freed only by the next
// Capture, which its owner calls after this one's Encode returned (the
// pusher encodes one snapshot at a time). Appends to the store may move
// its slices meanwhile; the capture reads the arrays it was given, whose
// label fields nobody writes.
type Capture struct {
	recs  records
	syms  []symbol
	plan  []planned
	stale []uint32
	f     []remotewrite.LabelField
}

// Capture expires nothing and frees the stale markers the previous
// capture wrote; it records ts (unix ms) as the first push of the series
// never pushed (newly reports whether there were any: the owner persists
// that before the snapshot leaves), and returns the snapshot to encode.
//
// delivered is the newest snapshot stamp every receiver accepted whole:
// a series first pushed no later needs no zero, also after a restart. A
// series this store's captures already wrote needs none either (the
// pusher is sending it). Any other series gets its zero at its creation,
// apart (MayExist) when it was restored from persisted state with a
// first push that may or may not have arrived.
func (s *Store) Capture(ts, delivered int64) (c *Capture, newly bool) {
	// The stale markers of the last capture are written: their series go,
	// unless a View still reads their labels (then at a later capture).
	s.held = append(s.held, s.stale...)
	s.stale = s.stale[:0]
	if s.pins == 0 {
		for _, ref := range s.held {
			s.release(ref)
		}
		s.held = s.held[:0]
	}
	prev := s.lastTS
	s.lastTS = ts
	plan := s.plan[:0]
	for ci := range s.recs.chunks {
		ch, base := s.recs.chunk(ci)
		for j := range ch {
			r := &ch[j]
			if r.state != stateLive {
				continue
			}
			p := planned{ref: base + uint32(j), bytes: r.bytes, packets: r.packets}
			if !r.sent {
				p.created, p.mayExist = r.zero(delivered)
				if p.created != 0 && !r.restored {
					// Made after the previous capture: its zero goes after
					// that one's stamp too, where the receiver may hold the
					// stale marker of a former series with its labels.
					p.created = max(p.created, prev+1)
				}
				r.sent = true
			}
			if r.pushed == 0 {
				r.pushed = ts
				newly = true
			}
			plan = append(plan, p)
		}
	}
	s.plan = plan
	// An expired series whose labels are live again (a pair that talked
	// again after its expiry) gets no stale marker: the new series goes
	// on under its labels, at the receivers a counter reset.
	for _, ref := range s.dying {
		r := s.recs.at(ref)
		if r.sent && !s.liveTwin(ref) {
			s.stale = append(s.stale, ref)
			r.state = stateStale
			continue
		}
		// Never pushed, or superseded: nothing to end. Freed now, unless
		// a View may still read it.
		if s.pins > 0 {
			s.held = append(s.held, ref)
			continue
		}
		s.release(ref)
	}
	s.dying = s.dying[:0]
	return &Capture{recs: s.recs, syms: s.syms.list, plan: plan, stale: s.stale}, newly
}

// zero returns the stamp of r's zero sample and whether a receiver may
// hold r already, for a series not sent by this store's captures yet.
func (r *record) zero(delivered int64) (created int64, mayExist bool) {
	if r.pushed != 0 && r.pushed <= delivered {
		return 0, false
	}
	return r.created, r.restored && r.pushed != 0
}

// Zero returns the zero a pusher meeting the live series ref for the
// first time would send (its stamp, 0 for none, and whether a receiver
// may hold the series) given delivered, without marking anything.
func (s *Store) Zero(ref uint32, delivered int64) (created int64, mayExist bool) {
	return s.recs.at(ref).zero(delivered)
}

// liveTwin reports whether a live series has the labels of the expired
// series ref. Labels are interned, so equal labels are equal symbols.
func (s *Store) liveTwin(ref uint32) bool {
	r := s.recs.at(ref)
	same := func(o uint32) bool {
		q := s.recs.at(o)
		return q.n == r.n && q.syms == r.syms
	}
	if o, ok := s.byHash[r.hash]; ok && same(o) {
		return true
	}
	for _, o := range s.collided[r.hash] {
		if same(o) {
			return true
		}
	}
	return false
}

// Encode writes the capture to w: every live series with its value (and
// zero, if due), then the stale markers.
func (c *Capture) Encode(w *remotewrite.SnapshotWriter) {
	for i := range c.plan {
		p := &c.plan[i]
		r := c.recs.at(p.ref)
		c.fields(r)
		w.Series(r.hash, c.f, float64(p.bytes), p.created, p.mayExist)
		if r.twin {
			c.f[0].Field = c.syms[r.pname].field
			w.Series(r.hash, c.f, float64(p.packets), p.created, p.mayExist)
		}
	}
	for _, ref := range c.stale {
		r := c.recs.at(ref)
		c.fields(r)
		w.Stale(r.hash, c.f)
		if r.twin {
			c.f[0].Field = c.syms[r.pname].field
			w.Stale(r.hash, c.f)
		}
	}
}

// fields sets c.f to r's label fields.
func (c *Capture) fields(r *record) {
	c.f = c.f[:0]
	for _, id := range r.syms[:r.n] {
		sym := &c.syms[id]
		c.f = append(c.f, remotewrite.LabelField{Name: sym.label.Name, Field: sym.field})
	}
}

// View is the store's live series at one instant, taken under the
// owner's lock and read without it (a checkpoint written while ingest goes
// on). It copies what changes (counters, times) and reads labels from the
// store itself: a view pins the store's records, so that no series it
// holds is freed (and its ref or symbols reused) until Unpin.
type View struct {
	recs  records
	syms  []symbol
	live  []viewed
	slots int
	done  bool
}

// viewed is what a View copies of a series.
type viewed struct {
	ref                   uint32
	kind                  Kind
	bytes, packets        uint64
	last, created, pushed int64
}

// View returns the live series as they are now. The owner calls Unpin
// with it, under its lock, once done reading.
func (s *Store) View() *View {
	// The copy reuses the last view's when no view is open: checkpoints
	// follow one another, and a fresh copy of a million series is a
	// fresh 48 MB to fault in under the lock.
	buf := s.viewBuf[:0]
	if s.pins > 0 || cap(buf) < s.live {
		buf = make([]viewed, 0, s.live+s.live/8)
	}
	if s.pins == 0 {
		s.viewBuf = buf
	}
	v := &View{recs: s.recs, syms: s.syms.list, live: buf, slots: s.recs.n}
	for ci := range s.recs.chunks {
		ch, base := s.recs.chunk(ci)
		for j := range ch {
			if r := &ch[j]; r.state == stateLive {
				v.live = append(v.live, viewed{ref: base + uint32(j), kind: r.kind, bytes: r.bytes, packets: r.packets,
					last: r.last, created: r.created, pushed: r.pushed})
			}
		}
	}
	s.pins++
	return v
}

// Unpin ends v's hold on the store's records (the next capture frees what
// waited for it). Calling it again does nothing.
func (s *Store) Unpin(v *View) {
	if !v.done {
		v.done = true
		s.pins--
	}
}

// Slots returns the refs the view spans (Store.Slots when taken).
func (v *View) Slots() int { return v.slots }

// Series is one series of a View.
type Series struct {
	Ref            uint32
	Kind           Kind
	Created        int64 // unix ms
	Last           int64 // unix ns
	Pushed         int64 // unix ms, 0 for never
	Bytes, Packets uint64
	// Labels are the bytes labels of a twin; valid until the callback
	// returns.
	Labels []metrics.Label
	// Symbols are the labels' symbols (View.Each only): indices into
	// View.Symbols, for a checkpoint that writes each label once.
	Symbols []uint32
}

// Symbols returns the label of every symbol slot the view's series may
// name, by symbol (free slots are the zero Label).
func (v *View) Symbols() []metrics.Label {
	out := make([]metrics.Label, len(v.syms))
	for i := range v.syms {
		out[i] = v.syms[i].label
	}
	return out
}

// Len returns the number of live series in the view.
func (v *View) Len() int { return len(v.live) }

// Each calls fn with every live series of the view, in ref order. It
// reads the store's labels: call it before Unpin.
func (v *View) Each(fn func(*Series)) {
	if v.done {
		panic("series: View read after Unpin")
	}
	var s Series
	for i := range v.live {
		w := &v.live[i]
		s = Series{Ref: w.ref, Kind: w.kind, Created: w.created, Last: w.last, Pushed: w.pushed,
			Bytes: w.bytes, Packets: w.packets, Labels: s.Labels[:0], Symbols: s.Symbols[:0]}
		r := v.recs.at(w.ref)
		for _, id := range r.syms[:r.n] {
			s.Labels = append(s.Labels, v.syms[id].label)
		}
		s.Symbols = append(s.Symbols, r.syms[:r.n]...)
		fn(&s)
	}
}

// Get sets *dst to the live series ref (dst.Labels reused).
func (s *Store) Get(ref uint32, dst *Series) {
	get(s.recs.at(ref), ref, s.syms.list, dst)
}

func get(r *record, ref uint32, syms []symbol, dst *Series) {
	*dst = Series{Ref: ref, Kind: r.kind, Created: r.created, Last: r.last, Pushed: r.pushed,
		Bytes: r.bytes, Packets: r.packets, Labels: dst.Labels[:0]}
	for _, id := range r.syms[:r.n] {
		dst.Labels = append(dst.Labels, syms[id].label)
	}
}
