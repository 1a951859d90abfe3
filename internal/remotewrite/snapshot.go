package remotewrite

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"hash/maphash"
	"math"
	"slices"

	"github.com/golang/snappy"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"google.golang.org/protobuf/encoding/protowire"
)

// seriesTable is what the pusher remembers between snapshots: one entry
// per series of the last snapshot, found by the identity of the source's
// label slice.
//
// Sources return the same immutable label slice for a series push after
// push (see Series), so the slice's address identifies the series, and
// the entry carries what its labels give: the content hash (shard, content
// index) and, within the cache's bound, the encoded label fields themselves, so
// that encoding a known series is one copy of its cached bytes plus its
// sample. Recognising a series needs no hashing either: its entry is
// almost always the successor of the previous series' entry in the last
// snapshot (seriesEntry.next), checked by comparing addresses; the map
// from address to entry is only the fallback, as its cache misses cost
// more than all the rest of a known series' work (SnapshotMapOrder100k
// against Snapshot100k, BENCHMARKS.md). A generation stamp per entry then finds both duplicates
// (an entry met twice in one snapshot) and vanished series (an entry not
// met), without sorting or merging anything.
//
// A label slice not seen before is encoded and looked up by content hash:
// it is a new series, a duplicate of one already in this snapshot (a
// misbehaving source; dropped), or a series whose source rebuilt its label
// slice with the same labels (the registry source does so at every push),
// which takes over the entry and so gets no stale marker. Series are the
// same when their encodings are: labels that differ only by an empty value
// are one series to a receiver, and so one here.
//
// A series that gets a new entry is one the receivers are not being sent:
// that is where its created-timestamp zero goes in (Series.Created).
type seriesTable struct {
	seed    maphash.Seed
	gen     uint32 // current snapshot; entries stamped with it are in it
	entries []seriesEntry
	head    int32   // entry of the first series of the last snapshot, or -1
	free    []int32 // free entry slots, reused first
	// byID finds an entry by the address of its label slice's first
	// element. Invariant: byID[id] == i implies &entries[i].labels[0] ==
	// id, so the entry keeps the address from being reused by another
	// slice while it is a key.
	byID map[*metrics.Label]int32
	// byHash finds an entry by the hash of its encoded labels. On a
	// 64-bit collision between different label sets the later one is
	// left out; it is then only found by identity.
	byHash map[uint64]int32
	// arena holds the encoded label fields of cached entries; dead counts
	// the bytes of freed ones, reclaimed by compact.
	arena []byte
	dead  int
	max   int
	// Below these sizes (freed arena bytes, entry slots) compact leaves
	// the table alone: reclaiming little is not worth a pass over it.
	// Variables for the tests.
	minDead, minEntries int
}

// seriesEntry is one series of the last snapshot or of the current one.
type seriesEntry struct {
	// labels is the source's label slice: the series' identity, and the
	// labels of its stale marker once it vanishes.
	labels []metrics.Label
	hash   uint64 // maphash of the encoded label fields
	off    uint32 // encoded label fields are arena[off:off+n] when cached
	n      uint32 // length of the encoded label fields
	gen    uint32 // last snapshot that contained the series; 0: free slot
	// next is the entry of the series that followed this one in the
	// last snapshot: sources return their series in the same order push
	// after push or, iterating a Go map, in that order rotated to a random
	// start (per map table), so it is almost always the next series'
	// entry.
	next   int32
	cached bool
}

// labelCacheBytes bounds the table's label cache. The table holds the
// series of sources that are not EncodingSources: self-metrics and the
// agents' series, some thousands, whose labels take a few MiB; the arena
// grows only as far as they need, and the bound (some 150,000 pod-pair
// shaped series) stops a source that misbehaves.
const labelCacheBytes = 64 << 20

// newSeriesTable returns an empty table whose label cache holds at most
// limit bytes.
//
// Caching is what makes a snapshot cheap: copying a pod-pair series'
// cached ~360 bytes costs a small fraction of encoding its 15 labels
// (Snapshot100k against SnapshotNewSeries10k, BENCHMARKS.md). But it costs
// that memory per series, so the arena stops at limit bytes (growing by
// half as needed); series beyond it are encoded afresh at every push.
func newSeriesTable(limit int) seriesTable {
	return seriesTable{
		seed:   maphash.MakeSeed(),
		byID:   map[*metrics.Label]int32{},
		byHash: map[uint64]int32{},
		head:   -1,
		max:    min(limit, math.MaxUint32),

		minDead:    1 << 20,
		minEntries: 1024,
	}
}

// snapshot reads all sources, drops duplicate series, adds stale markers
// for vanished ones, and encodes everything into compressed requests per
// shard, all stamped with ts; a series new to the table whose Created is
// before ts also gets its zero sample at Created. The returned slices are
// fresh (endpoints keep them); the scratch buffers behind them are reused.
func (p *Pusher) snapshot(ts int64) [][]request {
	t := &p.table
	n0 := len(p.cur)
	p.cur = p.cur[:0]
	var encoders []EncodingSource
	for _, src := range p.sources {
		if es, ok := src.(EncodingSource); ok {
			encoders = append(encoders, es)
			continue
		}
		p.cur = src.AppendSeries(p.cur)
	}
	if len(p.cur) < n0 {
		clear(p.cur[len(p.cur):n0]) // release label slices we no longer read
	}
	t.gen++
	if t.gen == 0 { // 0 marks free slots
		t.gen = 1
	}
	p.setSample(ts)
	for i := range p.reqs {
		p.reqs[i] = nil
		p.raw[i] = p.raw[i][:0]
		p.rawN[i] = 0
		p.zeros[i] = p.zeros[i][:0]
	}
	live := 0
	prev := int32(-1) // entry of the previous series
	for i := range p.cur {
		s := &p.cur[i]
		guess := t.head
		if prev >= 0 {
			guess = t.entries[prev].next
		}
		j, isNew := p.entryOf(s.Labels, guess)
		if j < 0 {
			p.duplicates.Inc()
			continue
		}
		if prev >= 0 {
			t.entries[prev].next = j
		} else {
			t.head = j
		}
		prev = j
		live++
		// The zero must be strictly older than the first real sample: at
		// the same stamp it would be a second value there, which
		// receivers reject.
		if isNew && s.Created != 0 && s.Created < ts {
			p.seriesWithZero(t.entries[j].hash, p.entryLabels(&t.entries[j]), s.Value, s.Created, s.MayExist)
			continue
		}
		p.put(t.entries[j].hash, p.entryLabels(&t.entries[j]), s.Value)
	}
	// Entries not stamped by this snapshot were in the previous one only:
	// their series vanished, so they get a stale marker and are forgotten.
	for i := range t.entries {
		e := &t.entries[i]
		if e.gen == 0 || e.gen == t.gen {
			continue
		}
		p.staleMarkers.Inc()
		p.put(e.hash, p.entryLabels(e), StaleNaN)
		t.release(int32(i))
	}
	// Sources that encode their own series (EncodingSource) come last:
	// they hold many more series than the others, and none of theirs is
	// in the table.
	w := &SnapshotWriter{p: p, ts: ts}
	for _, src := range encoders {
		src.EncodeSnapshot(ts, w)
	}
	p.snapshotSeries.Set(float64(live + w.live))
	for sh := range p.raw {
		p.flushShard(sh)
	}
	// A zero a receiver may refuse goes in a request of its own, after
	// the others of its shard (a series is in one request per snapshot,
	// so its samples stay in order): a refusal then costs that zero only,
	// never the zero of a series the receiver does not hold. There are
	// few: the series first pushed by the last pushes before a restart.
	for _, d := range p.maybe {
		p.putWithZero(d.hash, p.maybeLab[d.off:d.off+d.n], d.value, d.created)
		p.flushShard(p.shardOf(d.hash))
	}
	p.maybe, p.maybeLab = p.maybe[:0], p.maybeLab[:0]
	t.compact()
	out := make([][]request, len(p.reqs))
	copy(out, p.reqs)
	// The shards own the bodies now: holding them here until the next
	// push would keep a whole snapshot's requests alive after delivery.
	clear(p.reqs)
	return out
}

// entryOf returns the index of the entry of the series with labels ls,
// stamped as part of the current snapshot, or -1 if the snapshot already
// has that series; the bool reports a new entry, for a series that was not
// in the last snapshot. guess is the entry the series probably has (or
// -1): tried first, it saves the map lookup, whose cache misses are the
// costliest part of recognising a series.
func (p *Pusher) entryOf(ls []metrics.Label, guess int32) (int32, bool) {
	t := &p.table
	var id *metrics.Label
	if len(ls) > 0 {
		id = &ls[0]
		i, ok := guess, false
		if i >= 0 {
			ok = len(t.entries[i].labels) > 0 && &t.entries[i].labels[0] == id
		}
		if !ok {
			i, ok = t.byID[id]
		}
		// Same address and length: the same immutable slice.
		if ok && len(t.entries[i].labels) == len(ls) {
			e := &t.entries[i]
			if e.gen == t.gen {
				return -1, false
			}
			e.gen = t.gen
			return i, false
		}
	}
	// Unknown slice: find the series by content.
	p.sb.Reset()
	p.appendLabels(&p.sb, ls)
	enc := p.sb.encoded()
	h := maphash.Bytes(t.seed, enc)
	if i, ok := t.byHash[h]; ok && p.sameEncoding(&t.entries[i], enc) {
		e := &t.entries[i]
		if e.gen == t.gen {
			return -1, false
		}
		t.rebind(i, ls)
		e.gen = t.gen
		return i, false
	}
	i := t.alloc()
	e := &t.entries[i]
	*e = seriesEntry{labels: ls, hash: h, n: uint32(len(enc)), gen: t.gen, next: -1}
	if t.cache(enc) {
		e.off, e.cached = uint32(len(t.arena)), true
		t.arena = append(t.arena, enc...)
	}
	if _, taken := t.byHash[h]; !taken {
		t.byHash[h] = i
	}
	if id != nil {
		if _, taken := t.byID[id]; !taken {
			t.byID[id] = i
		}
	}
	return i, true
}

// sameEncoding reports whether e's labels encode to enc.
func (p *Pusher) sameEncoding(e *seriesEntry, enc []byte) bool {
	if int(e.n) != len(enc) {
		return false
	}
	if e.cached {
		return bytes.Equal(p.table.arena[e.off:e.off+e.n], enc)
	}
	p.cmp.Reset()
	p.appendLabels(&p.cmp, e.labels)
	return bytes.Equal(p.cmp.encoded(), enc)
}

// cache reports whether enc fits in the arena's bound, growing the arena
// for it if needed. Growth is by half (not append's doubling while small)
// and never past the bound, so the bound is what the arena may occupy.
func (t *seriesTable) cache(enc []byte) bool {
	need := len(t.arena) + len(enc)
	if need > t.max {
		return false
	}
	if need > cap(t.arena) {
		c := min(t.max, max(need, cap(t.arena)+cap(t.arena)/2, 64<<10))
		t.arena = append(make([]byte, 0, c), t.arena...)
	}
	return true
}

// alloc returns a free entry slot.
func (t *seriesTable) alloc() int32 {
	if n := len(t.free); n > 0 {
		i := t.free[n-1]
		t.free = t.free[:n-1]
		return i
	}
	t.entries = append(t.entries, seriesEntry{})
	return int32(len(t.entries) - 1)
}

// rebind makes ls, a new slice with the same labels, entry i's identity.
func (t *seriesTable) rebind(i int32, ls []metrics.Label) {
	e := &t.entries[i]
	if len(e.labels) > 0 {
		if j, ok := t.byID[&e.labels[0]]; ok && j == i {
			delete(t.byID, &e.labels[0])
		}
	}
	e.labels = ls
	if len(ls) > 0 {
		if _, taken := t.byID[&ls[0]]; !taken {
			t.byID[&ls[0]] = i
		}
	}
}

// release frees entry i.
func (t *seriesTable) release(i int32) {
	e := &t.entries[i]
	if len(e.labels) > 0 {
		if j, ok := t.byID[&e.labels[0]]; ok && j == i {
			delete(t.byID, &e.labels[0])
		}
	}
	if j, ok := t.byHash[e.hash]; ok && j == i {
		delete(t.byHash, e.hash)
	}
	if e.cached {
		t.dead += int(e.n)
	}
	*e = seriesEntry{next: -1}
	t.free = append(t.free, i)
}

// compact gives back what vanished series left behind once it is at
// least half of what is held: entry slots (after a burst of series the
// table would otherwise keep, and scan at every push, its largest size
// ever) and arena bytes.
func (t *seriesTable) compact() {
	if n := len(t.entries); n >= t.minEntries && len(t.free) > n/2 {
		t.shrink()
	}
	if t.dead < t.minDead || t.dead < len(t.arena)/2 {
		return
	}
	live := make([]int32, 0, len(t.entries)-len(t.free))
	for i := range t.entries {
		if t.entries[i].cached {
			live = append(live, int32(i))
		}
	}
	// In ascending offset order every move goes down, never over bytes
	// still to be moved.
	slices.SortFunc(live, func(a, b int32) int { return cmp.Compare(t.entries[a].off, t.entries[b].off) })
	w := uint32(0)
	for _, i := range live {
		e := &t.entries[i]
		copy(t.arena[w:], t.arena[e.off:e.off+e.n])
		e.off = w
		w += e.n
	}
	t.arena = t.arena[:w]
	if cap(t.arena) > 2*len(t.arena) {
		t.arena = slices.Clone(t.arena)
	}
	t.dead = 0
}

// shrink moves the live entries to a new, exactly sized slice and
// rebuilds the maps (Go maps never shrink). The successor links are
// dropped: the next snapshot finds its entries through byID once.
func (t *seriesTable) shrink() {
	live := make([]seriesEntry, 0, len(t.entries)-len(t.free))
	byID := make(map[*metrics.Label]int32, cap(live))
	byHash := make(map[uint64]int32, cap(live))
	for _, e := range t.entries {
		if e.gen == 0 {
			continue
		}
		i := int32(len(live))
		e.next = -1
		live = append(live, e)
		if _, taken := byHash[e.hash]; !taken {
			byHash[e.hash] = i
		}
		if len(e.labels) > 0 {
			if _, taken := byID[&e.labels[0]]; !taken {
				byID[&e.labels[0]] = i
			}
		}
	}
	t.entries, t.free, t.byID, t.byHash, t.head = live, nil, byID, byHash, -1
}

// setSample prepares p.sample, the encoded samples field of the snapshot
// (stamp ts, value left zero), exactly as SeriesBuilder.Sample writes it.
func (p *Pusher) setSample(ts int64) {
	size := 1 + 8
	if ts != 0 {
		size += 1 + protowire.SizeVarint(uint64(ts))
	}
	b := append(p.sample[:0],
		byte(fieldSeriesSamples<<3|protowire.BytesType), byte(size),
		byte(fieldSampleValue<<3|protowire.Fixed64Type))
	b = binary.LittleEndian.AppendUint64(b, 0)
	if ts != 0 {
		b = append(b, byte(fieldSampleTimestamp<<3|protowire.VarintType))
		b = protowire.AppendVarint(b, uint64(ts))
	}
	p.sample = b
}

// sampleValueOffset is where the value sits in p.sample: after the field
// tag, its one-byte length and the value's tag.
const sampleValueOffset = 3

// entryLabels returns the encoded label fields of e's series: its cached
// bytes, or an encoding made in p.sb (valid until the next use of p.sb).
func (p *Pusher) entryLabels(e *seriesEntry) []byte {
	if e.cached {
		return p.table.arena[e.off : e.off+e.n]
	}
	p.sb.Reset()
	p.appendLabels(&p.sb, e.labels)
	return p.sb.encoded()
}

// shardOf returns the shard of the series whose labels hash to h.
func (p *Pusher) shardOf(h uint64) int { return int(h % uint64(len(p.raw))) }

// seriesWithZero queues a series met for the first time, its zero at
// created included: in the request being built, or, when a receiver may
// hold the series already (Series.MayExist), in one of its own after the
// shard's others.
func (p *Pusher) seriesWithZero(h uint64, labels []byte, v float64, created int64, mayExist bool) {
	if !mayExist {
		p.putWithZero(h, labels, v, created)
		return
	}
	off := len(p.maybeLab)
	p.maybeLab = append(p.maybeLab, labels...)
	p.maybe = append(p.maybe, deferredZero{hash: h, off: off, n: len(labels), value: v, created: created})
}

// put appends the series with encoded label fields labels (hashing to h)
// and value v to its shard's request as a WriteRequest.timeseries field,
// closing the request when it is full.
func (p *Pusher) put(h uint64, labels []byte, v float64) {
	sh := p.shardOf(h)
	b := p.appendHead(p.raw[sh], labels, len(labels)+len(p.sample))
	p.finish(sh, b, v)
}

// putWithZero is put for a series met for the first time: its TimeSeries
// carries the zero sample at created, then v at the snapshot's stamp. It
// records where the zero sits so that flushShard can write the request's
// fallback, the same request without its zeros.
func (p *Pusher) putWithZero(h uint64, labels []byte, v float64, created int64) {
	sh := p.shardOf(h)
	p.zsample = appendSample(p.zsample[:0], 0, created)
	size := len(labels) + len(p.zsample) + len(p.sample)
	start := len(p.raw[sh])
	b := p.appendHead(p.raw[sh], labels, size)
	p.zeros[sh] = append(p.zeros[sh], zeroSpan{start: start, size: size, zero: len(b), n: len(p.zsample)})
	b = append(b, p.zsample...)
	p.finish(sh, b, v)
}

// appendHead appends to b the WriteRequest.timeseries tag and length of a
// series message of size bytes, and the series' encoded labels.
func (p *Pusher) appendHead(b, labels []byte, size int) []byte {
	b = slices.Grow(b, 1+protowire.SizeVarint(uint64(size))+size)
	b = append(b, byte(fieldWriteRequestTimeseries<<3|protowire.BytesType))
	b = protowire.AppendVarint(b, uint64(size))
	return append(b, labels...)
}

// finish appends the snapshot's sample with value v to shard sh's request
// b, closing the request when it is full.
func (p *Pusher) finish(sh int, b []byte, v float64) {
	o := len(b)
	b = append(b, p.sample...)
	binary.LittleEndian.PutUint64(b[o+sampleValueOffset:], math.Float64bits(v))
	p.raw[sh] = b
	p.rawN[sh]++
	if p.rawN[sh] >= p.cfg.MaxSeriesPerRequest {
		p.flushShard(sh)
	}
}

// deferredZero is a series whose zero sample goes in a request of its own
// (Series.MayExist).
type deferredZero struct {
	hash    uint64
	off, n  int // its encoded labels: maybeLab[off:off+n]
	value   float64
	created int64
}

// zeroSpan locates an injected zero sample in a shard's pending request.
type zeroSpan struct {
	start int // offset of the series' WriteRequest.timeseries tag
	size  int // length of the series' message, zero included
	zero  int // offset of the zero's TimeSeries.samples field
	n     int // length of that field
}

// stripZeros appends to dst the uncompressed request raw without the zero
// samples at spans (in ascending order), each series' length prefix
// shortened to match: exactly what add would have written for those
// series.
func stripZeros(dst, raw []byte, spans []zeroSpan) []byte {
	o := 0
	for _, z := range spans {
		body := z.start + 1 + protowire.SizeVarint(uint64(z.size))
		dst = append(dst, raw[o:z.start+1]...) // up to the series' tag
		dst = protowire.AppendVarint(dst, uint64(z.size-z.n))
		dst = append(dst, raw[body:z.zero]...)
		o = z.zero + z.n
	}
	return append(dst, raw[o:]...)
}

// flushShard compresses the shard's pending series into one request and,
// when they include zero samples, the request's fallback without them.
func (p *Pusher) flushShard(sh int) {
	if p.rawN[sh] == 0 {
		return
	}
	r := request{body: p.compress(p.raw[sh]), samples: p.rawN[sh]}
	if z := p.zeros[sh]; len(z) > 0 {
		p.plain = stripZeros(p.plain[:0], p.raw[sh], z)
		r.fallback = p.compress(p.plain)
		r.zeros = len(z)
		p.zeros[sh] = z[:0]
	}
	p.reqs[sh] = append(p.reqs[sh], r)
	p.raw[sh] = p.raw[sh][:0]
	p.rawN[sh] = 0
}

// compress returns raw snappy-compressed. The result is copied out of a
// reused scratch buffer so that what endpoints keep is exactly sized.
func (p *Pusher) compress(raw []byte) []byte {
	p.zbuf = snappy.Encode(p.zbuf[:cap(p.zbuf)], raw)
	body := make([]byte, len(p.zbuf))
	copy(body, p.zbuf)
	return body
}

// appendLabels writes to sb the series labels merged with the external
// and HA labels, both sorted, __name__ first. Labels with an empty value
// are left out: in Prometheus an empty label is an absent one.
func (p *Pusher) appendLabels(sb *SeriesBuilder, ls []metrics.Label) {
	if len(ls) > 0 && ls[0].Name == "__name__" {
		sb.Label(ls[0].Name, ls[0].Value)
		ls = ls[1:]
	}
	ex := p.extra
	for len(ls) > 0 || len(ex) > 0 {
		var l metrics.Label
		switch {
		case len(ex) == 0 || (len(ls) > 0 && ls[0].Name < ex[0].Name):
			l, ls = ls[0], ls[1:]
		case len(ls) == 0 || ex[0].Name < ls[0].Name:
			l, ex = ex[0].Label, ex[1:]
		default: // same name
			l = ls[0]
			if ex[0].override {
				l = ex[0].Label
			}
			ls, ex = ls[1:], ex[1:]
		}
		if l.Value != "" {
			sb.Label(l.Name, l.Value)
		}
	}
}
