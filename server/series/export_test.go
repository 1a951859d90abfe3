package series

// Reads and a reset the store's tests use, which the server has no use
// for.

import "github.com/kubezonnet/kubezonnet/internal/metrics"

// Drop frees every series not live: the expired ones whose stale markers
// are pending or written. For persisted state's replay, where no
// snapshot follows an expiry and refs must be reusable at once.
func (s *Store) Drop() {
	for _, list := range [][]uint32{s.held, s.stale, s.dying} {
		for _, ref := range list {
			s.release(ref)
		}
	}
	s.held, s.stale, s.dying = s.held[:0], s.stale[:0], s.dying[:0]
}

// Pushed returns the first push stamp of ref (0: never pushed).
func (s *Store) Pushed(ref uint32) int64 { return s.recs.at(ref).pushed }

// Labels appends the labels of ref (its bytes labels, for a twin) to dst.
func (s *Store) Labels(dst []metrics.Label, ref uint32) []metrics.Label {
	r := s.recs.at(ref)
	for _, id := range r.syms[:r.n] {
		dst = append(dst, s.syms.list[id].label)
	}
	return dst
}

// Len returns the number of live series captured (a twin counts once).
func (c *Capture) Len() int {
	n := 0
	for _, part := range c.plan {
		n += len(part)
	}
	return n
}

// Unpushed returns the number of live series never pushed, as the store
// counts them.
func (s *Store) Unpushed() int { return s.unpushed }

// ChunkSize is the records a capture walks, or a view copies, under one
// hold of the owner's lock.
const ChunkSize = chunkSize

// Values returns the bytes value each series of the capture goes with,
// by ref, and the refs of its stale markers.
func (c *Capture) Values() (map[uint32]uint64, []uint32) {
	out := make(map[uint32]uint64, c.Len())
	for _, part := range c.plan {
		for _, p := range part {
			out[p.ref] = p.bytes
		}
	}
	return out, c.stale
}
