//go:build linux

package bpf

import "github.com/kubezonnet/kubezonnet/internal/flow"

// logSum adds up the flow log's records by flow between drains, in one
// open-addressing table whose entries hold the kernel's key and the
// counts side by side: a record costs one probe of one entry, where the
// drain's merger (an index, the keys and the records apart) would touch
// three places, each a cache miss once the flows outgrow the caches. The
// log brings every packet of the flows the table had no room for, so this
// is the agent's cost per logged packet.
type logSum struct {
	// entries is a power of two long; an entry is free when its packet
	// count is zero (every record counts at least one packet).
	entries []logEntry
	// used lists the entries in use, in the order their flows came.
	used []int32
}

// logEntry is one flow of a logSum.
type logEntry struct {
	key flowFlowKey
	c   flow.Counts
}

// logSumStart is the entries of an empty logSum: it grows by doubling
// when three quarters are in use.
const logSumStart = 1024

// add adds c to flow k, which takes an entry of its own only while fewer
// than limit are in use. It reports whether k was a new flow, and whether
// c was added.
func (s *logSum) add(k *flowFlowKey, c flow.Counts, limit int) (fresh, added bool) {
	if len(s.entries) == 0 {
		s.entries = make([]logEntry, logSumStart)
	}
	h, found := s.find(k)
	e := &s.entries[h]
	switch {
	case found:
		e.c.Add(c)
		return false, true
	case len(s.used) >= limit:
		return false, false
	}
	e.key, e.c = *k, c
	s.used = append(s.used, int32(h))
	if 4*len(s.used) > 3*len(s.entries) {
		s.grow()
	}
	return true, true
}

// addExisting adds c to flow k and reports whether the sum had it.
func (s *logSum) addExisting(k *flowFlowKey, c flow.Counts) bool {
	if len(s.used) == 0 {
		return false
	}
	h, found := s.find(k)
	if found {
		s.entries[h].c.Add(c)
	}
	return found
}

// find returns the entry of flow k, or the free entry where it would go.
// The entries are never full (grow keeps a quarter free).
func (s *logSum) find(k *flowFlowKey) (h uint32, found bool) {
	mask := uint32(len(s.entries) - 1)
	for h = keyHash(k) & mask; s.entries[h].c.Packets != 0; h = (h + 1) & mask {
		if s.entries[h].key == *k {
			return h, true
		}
	}
	return h, false
}

// grow doubles the entries and puts the flows back.
func (s *logSum) grow() {
	old := s.entries
	s.entries = make([]logEntry, 2*len(old))
	mask := uint32(len(s.entries) - 1)
	for i, at := range s.used {
		e := &old[at]
		h := keyHash(&e.key) & mask
		for s.entries[h].c.Packets != 0 {
			h = (h + 1) & mask
		}
		s.entries[h] = *e
		s.used[i] = int32(h)
	}
}

// flows calls fn with each flow, in the order they came.
func (s *logSum) flows(fn func(k *flowFlowKey, c flow.Counts)) {
	for _, at := range s.used {
		e := &s.entries[at]
		fn(&e.key, e.c)
	}
}

// reset empties the sum, keeping its entries' memory.
func (s *logSum) reset() {
	for _, at := range s.used {
		s.entries[at] = logEntry{}
	}
	s.used = s.used[:0]
}
