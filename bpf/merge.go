//go:build linux

package bpf

import (
	"encoding/binary"

	"github.com/kubezonnet/kubezonnet/internal/flow"
)

// merger collects the flows of one drain, each once: a flow sent from
// several CPUs has a slot in each CPU's table region, and a flow can be in
// both the table and the hash map. The first source with flows needs no
// lookups (a region holds a flow at most once); from the second on, every
// flow is looked up in an open-addressing index of the flows so far.
//
// A purpose-built index rather than a Go map: the keys are the kernel's
// keys, already in hand, and the index is a flat []int32 reused from drain
// to drain; the map's cost is cache misses on its larger entries and on
// growth.
//
// Kept for the agent's flush budget: BenchmarkMerge's map baseline against
// DrainEncodeFlush (BENCHMARKS.md, "eBPF datapath" and "Agent").
type merger struct {
	keys    []flowFlowKey // kernel key of each record, in order
	slots   []int32       // record index + 1; 0 is empty
	indexed bool
}

// reset starts a drain.
func (m *merger) reset() {
	m.keys = m.keys[:0]
	m.indexed = false
}

// startIndex indexes the flows collected so far, if not done yet: called
// when a second source of flows begins.
func (m *merger) startIndex(flows []flow.Record) {
	if m.indexed || len(flows) == 0 {
		return
	}
	m.indexed = true
	m.rehash(len(flows))
}

// rehash sizes the index for at least 4 x n records and re-inserts the
// records.
func (m *merger) rehash(n int) {
	size := 1024
	for size < 4*n {
		size *= 2
	}
	if cap(m.slots) >= size {
		m.slots = m.slots[:size]
		clear(m.slots)
	} else {
		m.slots = make([]int32, size)
	}
	mask := uint32(size - 1)
	for i := range m.keys {
		h := keyHash(&m.keys[i]) & mask
		for m.slots[h] != 0 {
			h = (h + 1) & mask
		}
		m.slots[h] = int32(i + 1)
	}
}

// add appends the flow k with counts c to flows, or adds c to the record
// already there for k.
func (m *merger) add(flows []flow.Record, k *flowFlowKey, c flow.Counts) []flow.Record {
	if m.indexed {
		if 2*len(m.keys) >= len(m.slots) {
			m.rehash(len(m.keys))
		}
		mask := uint32(len(m.slots) - 1)
		h := keyHash(k) & mask
		for {
			r := m.slots[h]
			if r == 0 {
				m.slots[h] = int32(len(flows) + 1)
				break
			}
			if m.keys[r-1] == *k {
				flows[r-1].Counts.Add(c)
				return flows
			}
			h = (h + 1) & mask
		}
	}
	m.keys = append(m.keys, *k)
	return append(flows, flow.Record{Key: convertKey(k), Counts: c})
}

// keyHash mixes the key's 64-bit words one after the other, then
// finalizes. Each word's
// high half is folded onto its low half before the multiplication, which
// carries bits only upwards: an IPv4 address sits in the high half of its
// word, and the index masks the result's low bits.
func keyHash(k *flowFlowKey) uint32 {
	le := binary.LittleEndian
	var h uint64
	for _, w := range [...]uint64{
		le.Uint64(k.Saddr[:8]), le.Uint64(k.Saddr[8:]), le.Uint64(k.Daddr[:8]), le.Uint64(k.Daddr[8:]),
		uint64(k.Port) | uint64(k.Proto)<<16 | uint64(k.Flags)<<24 | uint64(k.OrigPort)<<32,
		le.Uint64(k.OrigDaddr[:8]), le.Uint64(k.OrigDaddr[8:]),
	} {
		h = (h ^ w ^ w>>32) * 0x9E3779B97F4A7C15
		h ^= h >> 32
	}
	// MurmurHash3's finalizer: the last word's bits reach the low bits too.
	h *= 0xFF51AFD7ED558CCD
	h ^= h >> 33
	return uint32(h)
}
