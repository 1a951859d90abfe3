package series

import (
	"slices"
	"sync"

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
// the stale markers of the expired ones. The owner starts it under its
// lock (StartCapture) and lets it walk the records a chunk at a time
// (Walk), taking the lock for each chunk only, so that a push of
// millions of series holds ingest up for no more than one chunk's copy
// of counters; it then encodes without the lock (Encode).
//
// A capture holds the series live when it started, each with its value
// when its chunk was walked (counters are cumulative: a value a moment
// newer than the stamp is as true). A series declared while it walks is
// not in it (its zero would follow the stamp); the next capture holds
// it. Expiries while it walks go to the next capture too.
//
// Encode reads the records' labels and the symbols without the lock.
// That is safe because neither changes while a capture may be encoded: a
// record's labels are written when it is declared, into a free ref, and
// the refs and symbols a capture reads are freed only by the next
// capture, which its owner starts after this one's Encode returned (the
// pusher encodes one snapshot at a time). Appends to the store may move
// its slices meanwhile; the capture reads the arrays it was given, whose
// label fields nobody writes.
type Capture struct {
	recs  records
	syms  []symbol
	plan  [][]planned // by chunk
	stale []uint32
	f     []remotewrite.LabelField

	s                   *Store
	ts, prev, delivered int64
	chunks              int  // chunks to walk: those holding the refs at the start
	walked              bool // Walk is done
}

// Capture is StartCapture and Walk in one, under the owner's lock
// throughout.
func (s *Store) Capture(ts, delivered int64) (c *Capture, newly bool) {
	c, newly = s.StartCapture(ts, delivered)
	for ci := range c.chunks {
		c.walkChunk(ci)
	}
	c.finish()
	return c, newly
}

// StartCapture expires nothing and frees the stale markers the previous
// capture wrote; it writes the stale markers of the series expired since
// (into the capture), and starts a capture stamped ts (unix ms) of the
// series live now. newly reports whether one of them was never pushed:
// Walk records ts as their first push, and the owner persists that before
// the snapshot leaves (and before another series is declared, which the
// capture does not hold).
//
// delivered is the newest snapshot stamp every receiver accepted whole:
// a series first pushed no later needs no zero, also after a restart. A
// series this store's captures already wrote needs none either (the
// pusher is sending it). Any other series gets its zero at its creation,
// apart (MayExist) when it was restored from persisted state with a
// first push that may or may not have arrived.
//
// Until Walk returns, the owner starts no other capture and no View.
func (s *Store) StartCapture(ts, delivered int64) (c *Capture, newly bool) {
	if s.walk != nil {
		panic("series: capture started while another walks")
	}
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
	// An expired series whose labels are live again (a pair that talked
	// again after its expiry) gets no stale marker: the new series goes
	// on under its labels, at the receivers a counter reset.
	for _, ref := range s.dying {
		r := s.recs.at(ref)
		if r.sent && !s.liveTwin(ref) {
			s.touch(ref)
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
	// A plan per chunk, reused from the last capture: one of the whole
	// store would grow in the walk, copying all planned so far under one
	// hold of the lock.
	n := len(s.recs.chunks)
	c = &Capture{s: s, ts: ts, prev: s.lastTS, delivered: delivered, plan: slices.Grow(s.plan[:0], n)[:n],
		stale: s.stale, chunks: n}
	s.lastTS = ts
	s.walk = c
	return c, s.unpushed > 0
}

// Walk reads the capture's series chunk by chunk (chunkSize records),
// taking mu for each chunk and for the end of the walk. The owner calls
// it without holding mu.
func (c *Capture) Walk(mu sync.Locker) {
	for ci := range c.chunks {
		mu.Lock()
		c.walkChunk(ci)
		mu.Unlock()
	}
	mu.Lock()
	c.finish()
	mu.Unlock()
}

// walkChunk adds chunk ci's series to the capture.
func (c *Capture) walkChunk(ci int) {
	s := c.s
	ch, base := s.recs.chunk(ci)
	s.touchChunk(ci)
	plan := c.plan[ci][:0]
	defer func() { c.plan[ci] = plan }()
	for j := range ch {
		r := &ch[j]
		if r.state != stateLive || r.fresh {
			continue
		}
		p := planned{ref: base + uint32(j), bytes: r.bytes, packets: r.packets}
		if !r.sent {
			p.created, p.mayExist = r.zero(c.delivered)
			if p.created != 0 && !r.restored {
				// Made after the previous capture: its zero goes after
				// that one's stamp too, where the receiver may hold the
				// stale marker of a former series with its labels.
				p.created = max(p.created, c.prev+1)
			}
			r.sent = true
		}
		if r.pushed == 0 {
			r.pushed = c.ts
			s.unpushed--
		}
		plan = append(plan, p)
	}
}

// finish ends the walk: the series declared meanwhile are the next
// capture's like any other.
func (c *Capture) finish() {
	s := c.s
	for _, ref := range s.fresh {
		s.recs.at(ref).fresh = false
	}
	s.fresh = s.fresh[:0]
	s.plan = c.plan
	c.recs, c.syms = s.recs, s.syms.list
	s.walk = nil
	c.walked = true
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
	if !c.walked {
		panic("series: Capture encoded before its walk")
	}
	for _, part := range c.plan {
		for i := range part {
			c.encode(w, &part[i])
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

// encode writes the series p plans.
func (c *Capture) encode(w *remotewrite.SnapshotWriter, p *planned) {
	r := c.recs.at(p.ref)
	c.fields(r)
	w.Series(r.hash, c.f, float64(p.bytes), p.created, p.mayExist)
	if r.twin {
		c.f[0].Field = c.syms[r.pname].field
		w.Series(r.hash, c.f, float64(p.packets), p.created, p.mayExist)
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

// View is the store's live series at one instant, read without the
// owner's lock (a checkpoint written while ingest goes on). It copies
// what changes (counters, times) a chunk of records at a time (Fill), and
// a record of a chunk not copied yet is copied before it changes, so the
// copy is of the instant the view started however long the copy takes.
// It reads labels from the store itself: a view pins the store's
// records, so that no series it holds is freed (and its ref or symbols
// reused) until Unpin.
type View struct {
	recs   records
	syms   []symbol
	parts  [][]viewed // by chunk
	copied []bool     // by chunk
	slots  int
	filled bool
	done   bool
}

// viewed is what a View copies of a series.
type viewed struct {
	ref                   uint32
	kind                  Kind
	bytes, packets        uint64
	last, created, pushed int64
}

// View is StartView and Fill in one, under the owner's lock throughout.
func (s *Store) View() *View {
	v := s.StartView()
	for c := range v.copied {
		s.copyChunk(v, c)
	}
	s.endFill(v)
	return v
}

// StartView starts a view of the live series as they are now: the place
// to cut the owner's journal, so that the view holds exactly what came
// before the cut. Fill copies it. The owner calls Unpin with it, under
// its lock, once done reading. A view cannot start while a capture walks
// (Capture.Walk): their orders would cross.
func (s *Store) StartView() *View {
	if s.walk != nil {
		panic("series: view started while a capture walks")
	}
	if s.filling != nil {
		// One copy under way at a time: the other one ends now.
		v := s.filling
		for c := range v.copied {
			s.copyChunk(v, c)
		}
		s.endFill(v)
	}
	n := len(s.recs.chunks)
	// The copies reuse the last view's when no view is open: checkpoints
	// follow one another, and a fresh copy of a million series is a fresh
	// 48 MB to fault in.
	var parts [][]viewed
	if s.pins == 0 {
		parts = slices.Grow(s.viewParts[:0], n)[:n]
		s.viewParts = parts
	} else {
		parts = make([][]viewed, n)
	}
	v := &View{recs: s.recs, syms: s.syms.list, parts: parts, copied: make([]bool, n), slots: s.recs.n}
	s.filling = v
	s.pins++
	return v
}

// Fill copies the view's series chunk by chunk, taking mu for each chunk
// not copied yet. The owner calls it without holding mu.
func (v *View) Fill(s *Store, mu sync.Locker) {
	for c := range v.copied {
		mu.Lock()
		s.copyChunk(v, c)
		mu.Unlock()
	}
	mu.Lock()
	s.endFill(v)
	mu.Unlock()
}

// copyChunk copies chunk c's live series into v, unless done already.
func (s *Store) copyChunk(v *View, c int) {
	if v.copied[c] {
		return
	}
	v.copied[c] = true
	base := c << chunkBits
	ch := v.recs.chunks[c][:min(chunkSize, v.slots-base)]
	part := v.parts[c][:0]
	for j := range ch {
		if r := &ch[j]; r.state == stateLive {
			part = append(part, viewed{ref: uint32(base + j), kind: r.kind, bytes: r.bytes, packets: r.packets,
				last: r.last, created: r.created, pushed: r.pushed})
		}
	}
	v.parts[c] = part
}

// endFill marks v copied whole.
func (s *Store) endFill(v *View) {
	if s.filling == v {
		s.filling = nil
	}
	v.filled = true
}

// touch copies the chunk of ref into the view being filled, if that
// view has not copied it yet: called before any change to a record.
func (s *Store) touch(ref uint32) { s.touchChunk(int(ref >> chunkBits)) }

func (s *Store) touchChunk(c int) {
	if v := s.filling; v != nil && c < len(v.copied) {
		s.copyChunk(v, c)
	}
}

// Unpin ends v's hold on the store's records (the next capture frees what
// waited for it). Calling it again does nothing.
func (s *Store) Unpin(v *View) {
	if !v.done {
		v.done = true
		s.pins--
		if s.filling == v {
			s.filling = nil
		}
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
func (v *View) Len() int {
	n := 0
	for _, p := range v.parts {
		n += len(p)
	}
	return n
}

// Each calls fn with every live series of the view, in ref order. It
// reads the store's labels: call it before Unpin.
func (v *View) Each(fn func(*Series)) {
	if v.done || !v.filled {
		panic("series: View read after Unpin, or before Fill")
	}
	var s Series
	for _, part := range v.parts {
		for i := range part {
			v.each(&part[i], &s, fn)
		}
	}
}

func (v *View) each(w *viewed, s *Series, fn func(*Series)) {
	*s = Series{Ref: w.ref, Kind: w.kind, Created: w.created, Last: w.last, Pushed: w.pushed,
		Bytes: w.bytes, Packets: w.packets, Labels: s.Labels[:0], Symbols: s.Symbols[:0]}
	r := v.recs.at(w.ref)
	for _, id := range r.syms[:r.n] {
		s.Labels = append(s.Labels, v.syms[id].label)
	}
	s.Symbols = append(s.Symbols, r.syms[:r.n]...)
	fn(s)
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
