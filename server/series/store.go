// Package series is the server's series store: every aggregated series
// by a stable numeric ref, with its labels interned and its counters in
// one flat slice, read by the aggregator per flow, by the pusher per
// snapshot and by checkpoints.
//
// A series is declared once (Create, or Install when replaying state)
// with its labels and, for a bytes/packets twin, the packets series'
// name: the twin is one record, and one ref. Updates are (ref, counts)
// pairs. Removal is explicit: Expire takes idle series out of the index
// at once, and the next snapshot writes their stale markers itself, so
// the pusher keeps nothing per series.
//
// Labels are held as symbols (symbols.go): each distinct name=value pair
// is stored, and encoded for remote write, once for all the series that
// carry it. A pod-pair record is then about a hundred bytes in all,
// rather than fourteen label strings per series and their encoding in
// the pusher.
//
// A Store is not safe for concurrent use: its owner serialises calls
// (the aggregator's lock). What reads every series keeps from stalling
// ingest: a capture (Capture.Walk) and a view (View.Fill) take that lock
// for one chunk of records at a time, and a capture's Encode runs
// without it (see Capture and View).
package series

import (
	"hash/maphash"
	"slices"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
)

// MaxLabels bounds the labels of a series, __name__ included: the widest
// series of the contract (a pod pair) has 14.
const MaxLabels = 14

// Kind is the owner's classification of a series (pod pair, zone pair,
// ...), kept with it and counted per kind. Kind 0 is reserved: it is what
// a free ref reports.
type Kind uint8

// MaxKinds bounds Kind values.
const MaxKinds = 8

// Free is the Kind of a ref that holds no live series.
const Free Kind = 0

type state uint8

const (
	stateFree  state = iota
	stateLive        // in the index, counted, in snapshots
	stateDying       // expired: its stale marker goes in the next snapshot
	stateStale       // its stale marker was captured; freed at the next capture
)

// record is one series, or a bytes/packets twin.
type record struct {
	syms  [MaxLabels]uint32
	pname uint32 // symbol of the packets twin's __name__
	n     uint8  // labels in syms
	kind  Kind
	state state
	twin  bool
	// restored: the series comes from persisted state. Unless its first
	// push is known to be delivered, a receiver may or may not hold it
	// (remotewrite.Series.MayExist).
	restored bool
	// sent: a capture of this store already wrote the series, so the
	// pusher sends it and it needs no zero.
	sent bool
	// fresh: declared while a capture walks the records (Capture.Walk),
	// so not in it: the next capture holds it.
	fresh   bool
	hash    uint64
	bytes   uint64
	packets uint64
	last    int64 // unix nanoseconds of the last update
	created int64 // unix milliseconds of the creation
	// pushed is the stamp (unix ms) of the first snapshot that held the
	// series, 0 before (also across restarts, with persisted state).
	pushed int64
}

// records are the store's records by ref, in chunks of a fixed size:
// growing never copies what is there (nor holds it twice, old and new
// array, at the peak), and a record stays at its address, which Capture
// and View rely on.
type records struct {
	chunks [][]record
	n      int // refs in use: the slots
}

const (
	chunkBits = 12
	chunkSize = 1 << chunkBits
)

// at returns the record of ref (< n).
func (rs *records) at(ref uint32) *record {
	return &rs.chunks[ref>>chunkBits][ref&(chunkSize-1)]
}

// chunk returns chunk i cut to the refs in use, and its first ref: the
// walks over every record go chunk by chunk.
func (rs *records) chunk(i int) ([]record, uint32) {
	base := i << chunkBits
	return rs.chunks[i][:min(chunkSize, rs.n-base)], uint32(base)
}

// add makes one more ref valid, a free record.
func (rs *records) add() {
	if rs.n == len(rs.chunks)*chunkSize {
		rs.chunks = append(rs.chunks, make([]record, chunkSize))
	}
	rs.n++
}

// Store holds the series. The zero value is not usable: call New.
type Store struct {
	seed     maphash.Seed
	syms     symbols
	recs     records
	free     []uint32 // free refs, reused first
	byHash   map[uint64]uint32
	collided map[uint64][]uint32 // same hash, other labels: practically never
	perKind  [MaxKinds]int
	live     int
	// dying are the refs expired since the last capture; stale the ones
	// whose stale markers the last capture wrote; held the ones to free
	// once no View pins the records (pins counts the open ones).
	dying, stale, held []uint32
	pins               int
	// lastTS is the stamp of the last capture.
	lastTS int64
	plan   [][]planned // the last capture's, by chunk, reused
	// walk is the capture whose walk over the records is under way, and
	// fresh the refs declared meanwhile (not in it).
	walk  *Capture
	fresh []uint32
	// unpushed counts the live series never pushed: whether the next
	// capture pushes one for the first time is known before it walks.
	unpushed int
	// filling is the view whose copy is under way: a record of a chunk
	// it has not copied yet is copied before it changes (touch).
	filling *View
	// viewParts are the copies of the last View, reused by the next.
	viewParts [][]viewed
}

// New returns an empty store.
func New() *Store {
	return &Store{
		seed:     maphash.MakeSeed(),
		syms:     newSymbols(),
		byHash:   map[uint64]uint32{},
		collided: map[uint64][]uint32{},
	}
}

// Len returns the number of live series (a twin counts once).
func (s *Store) Len() int { return s.live }

// Count returns the number of live series of kind k.
func (s *Store) Count(k Kind) int { return s.perKind[k] }

// Slots returns one more than the highest ref ever used: the refs a
// checkpoint may name.
func (s *Store) Slots() int { return s.recs.n }

// Symbols returns the number of distinct labels held.
func (s *Store) Symbols() int { return s.syms.len() }

// Hash returns the hash of a label set, the one Lookup and Install use.
func (s *Store) Hash(ls []metrics.Label) uint64 {
	var h maphash.Hash
	h.SetSeed(s.seed)
	for _, l := range ls {
		h.WriteString(l.Name)
		h.WriteByte(0)
		h.WriteString(l.Value)
		h.WriteByte(0)
	}
	return h.Sum64()
}

// Lookup returns the ref of the live series labelled ls (its bytes
// labels, for a twin).
func (s *Store) Lookup(ls []metrics.Label) (uint32, bool) {
	return s.LookupHashed(ls, s.Hash(ls))
}

// LookupHashed is Lookup for labels whose hash (Hash) the caller has.
func (s *Store) LookupHashed(ls []metrics.Label, h uint64) (uint32, bool) {
	if ref, ok := s.byHash[h]; ok && s.equal(ref, ls) {
		return ref, true
	}
	for _, ref := range s.collided[h] {
		if s.equal(ref, ls) {
			return ref, true
		}
	}
	return 0, false
}

// equal reports whether ref is labelled ls.
func (s *Store) equal(ref uint32, ls []metrics.Label) bool {
	r := s.recs.at(ref)
	if int(r.n) != len(ls) {
		return false
	}
	for i, id := range r.syms[:r.n] {
		if s.syms.list[id].label != ls[i] {
			return false
		}
	}
	return true
}

// Create declares a new series of kind k labelled ls (sorted by name,
// __name__ first, no empty value, at most MaxLabels; the caller checked
// Lookup first), created at created (unix ms) and last updated at last
// (unix ns), and returns its ref. packets, when not empty, makes it a
// twin: the same labels under that __name__ count packets. The store
// interns ls; the caller may reuse the slice.
func (s *Store) Create(k Kind, ls []metrics.Label, packets string, created, last int64) uint32 {
	ref := s.alloc()
	s.install(ref, k, ls, packets, created, s.Hash(ls))
	s.recs.at(ref).last = last
	return ref
}

// Install declares the series of kind k labelled ls at ref, which must
// be free or the first ref past the highest used: replaying persisted
// state, whose refs are what later records name. h is Hash(ls).
func (s *Store) Install(ref uint32, k Kind, ls []metrics.Label, packets string, created int64, h uint64) {
	for int(ref) >= s.recs.n {
		s.recs.add()
	}
	if s.recs.at(ref).state != stateFree {
		panic("series: install over a used ref")
	}
	s.install(ref, k, ls, packets, created, h)
	s.recs.at(ref).restored = true
}

func (s *Store) install(ref uint32, k Kind, ls []metrics.Label, packets string, created int64, h uint64) {
	if len(ls) == 0 || len(ls) > MaxLabels || k == Free || k >= MaxKinds {
		panic("series: bad declaration")
	}
	s.touch(ref)
	r := s.recs.at(ref)
	*r = record{kind: k, state: stateLive, n: uint8(len(ls)), hash: h, created: created}
	if s.walk != nil {
		r.fresh = true
		s.fresh = append(s.fresh, ref)
	}
	for i, l := range ls {
		r.syms[i] = s.syms.intern(l)
	}
	if packets != "" {
		r.twin = true
		r.pname = s.syms.intern(metrics.Label{Name: "__name__", Value: packets})
	}
	if _, taken := s.byHash[h]; taken {
		s.collided[h] = append(s.collided[h], ref)
	} else {
		s.byHash[h] = ref
	}
	s.perKind[k]++
	s.live++
	s.unpushed++
}

// alloc returns a free ref.
func (s *Store) alloc() uint32 {
	if n := len(s.free); n > 0 {
		ref := s.free[n-1]
		s.free = s.free[:n-1]
		return ref
	}
	s.recs.add()
	return uint32(s.recs.n - 1)
}

// Add adds counts to the live series ref, updated at ts (unix ns).
func (s *Store) Add(ref uint32, bytes, packets uint64, ts int64) {
	s.touch(ref)
	r := s.recs.at(ref)
	r.bytes += bytes
	r.packets += packets
	r.last = ts
}

// Kind returns the kind of ref, Free unless it holds a live series.
func (s *Store) Kind(ref uint32) Kind {
	if int(ref) >= s.recs.n || s.recs.at(ref).state != stateLive {
		return Free
	}
	return s.recs.at(ref).kind
}

// Counts returns the counters of ref.
func (s *Store) Counts(ref uint32) (bytes, packets uint64) {
	r := s.recs.at(ref)
	return r.bytes, r.packets
}

// Restore sets what persisted state says of the series ref beyond its
// declaration: counters, last update (unix ns) and first push (unix ms,
// 0 for none).
func (s *Store) Restore(ref uint32, bytes, packets uint64, last, pushed int64) {
	s.touch(ref)
	r := s.recs.at(ref)
	if r.state == stateLive && (r.pushed == 0) != (pushed == 0) {
		if pushed == 0 {
			s.unpushed++
		} else {
			s.unpushed--
		}
	}
	r.bytes, r.packets, r.last, r.pushed = bytes, packets, last, pushed
}

// SetPushed records that the series ref was first pushed at ts (unix ms)
// when it was not pushed yet (replaying persisted state).
func (s *Store) SetPushed(ref uint32, ts int64) {
	if r := s.recs.at(ref); r.state == stateLive && r.pushed == 0 && ts != 0 {
		s.touch(ref)
		r.pushed = ts
		s.unpushed--
	}
}

// Expire takes the live series last updated before cutoff (unix ns) out
// of the index, appends their refs to dead and returns it. Their stale
// markers go in the next capture; their refs are reused after it.
func (s *Store) Expire(cutoff int64, dead []uint32) []uint32 {
	for ci := range s.recs.chunks {
		dead = s.ExpireChunk(ci, cutoff, dead)
	}
	return dead
}

// Chunks returns the number of chunks of records (chunkSize each): the
// units ExpireChunk, Capture.Walk and View.Fill go by.
func (s *Store) Chunks() int { return len(s.recs.chunks) }

// ExpireChunk is Expire over the records of chunk ci (< Chunks()) only,
// for an owner that expires a chunk per hold of its lock.
func (s *Store) ExpireChunk(ci int, cutoff int64, dead []uint32) []uint32 {
	ch, base := s.recs.chunk(ci)
	for j := range ch {
		r := &ch[j]
		if r.state != stateLive || r.last >= cutoff {
			continue
		}
		ref := base + uint32(j)
		s.touch(ref)
		s.unindex(ref)
		r.state = stateDying
		s.dying = append(s.dying, ref)
		dead = append(dead, ref)
	}
	return dead
}

// unindex removes the live series ref from the index and the counts.
func (s *Store) unindex(ref uint32) {
	r := s.recs.at(ref)
	h := r.hash
	if cur, ok := s.byHash[h]; ok && cur == ref {
		if rest := s.collided[h]; len(rest) > 0 {
			s.byHash[h] = rest[0]
			s.setCollided(h, rest[1:])
		} else {
			delete(s.byHash, h)
		}
	} else {
		list := s.collided[h]
		if i := slices.Index(list, ref); i >= 0 {
			s.setCollided(h, slices.Delete(list, i, i+1))
		}
	}
	s.perKind[r.kind]--
	s.live--
	if r.pushed == 0 {
		s.unpushed--
	}
}

func (s *Store) setCollided(h uint64, list []uint32) {
	if len(list) == 0 {
		delete(s.collided, h)
		return
	}
	s.collided[h] = list
}

// release frees ref and its symbols.
func (s *Store) release(ref uint32) {
	s.touch(ref)
	r := s.recs.at(ref)
	for _, id := range r.syms[:r.n] {
		s.syms.release(id)
	}
	if r.twin {
		s.syms.release(r.pname)
	}
	*r = record{}
	s.free = append(s.free, ref)
}

// Remove takes the live series ref out at once, ref free for reuse, with
// no stale marker: replaying persisted state, which no snapshot follows.
func (s *Store) Remove(ref uint32) {
	if s.recs.at(ref).state != stateLive {
		return
	}
	s.unindex(ref)
	s.release(ref)
}

// Grow makes refs below n valid (free), for Install in any order.
func (s *Store) Grow(n int) {
	for s.recs.n < n {
		s.recs.add()
	}
}

// Rebuild recomputes the free list from the records (after Install at
// chosen refs), lowest ref reused first.
func (s *Store) Rebuild() {
	s.free = s.free[:0]
	for i := s.recs.n - 1; i >= 0; i-- {
		if s.recs.at(uint32(i)).state == stateFree {
			s.free = append(s.free, uint32(i))
		}
	}
}

// EachLive calls fn with every live series' ref, in ref order.
func (s *Store) EachLive(fn func(ref uint32)) {
	for i := range s.recs.n {
		if s.recs.at(uint32(i)).state == stateLive {
			fn(uint32(i))
		}
	}
}
