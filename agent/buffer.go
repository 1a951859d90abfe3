package agent

import (
	"slices"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// buffer holds drained flows that are not sent yet. It is bounded by flow
// count, not by time: a flow seen again only adds to its counts, so an
// hour-long server outage costs no bytes and no more memory than max flows.
// When full, a new flow is refused and its counts are returned to the
// caller to be counted as dropped.
//
// In steady state the buffer is empty when a drain arrives, and a drain
// holds each flow once, so the records are copied as they are; the index
// (a map from flow to position) is only built when a second drain has to
// be merged into a non-empty buffer, i.e. while the server is unreachable.
//
// A release of a pod address seals what was drained up to it: the sealed
// part goes out as a batch of its own, with the release, before anything
// drained later, so the server can tell the released pod's flows from its
// successor's (wire.Batch.Released).
type buffer struct {
	max   int
	list  []flow.Record
	index map[flow.Key]int

	sealed    []flow.Record
	sealedRel []wire.Release
	sealedAt  time.Time
}

func newBuffer(max int) *buffer {
	return &buffer{max: max}
}

// add merges records (each key at most once, as a drain returns them) and
// returns what did not fit.
func (b *buffer) add(records []flow.Record) (dropped flow.Counts) {
	room := b.max - len(b.sealed)
	if len(b.list) == 0 {
		n := min(len(records), room)
		b.list = append(b.list[:0], records[:n]...)
		for _, r := range records[n:] {
			dropped.Add(r.Counts)
		}
		return dropped
	}
	if b.index == nil {
		b.index = make(map[flow.Key]int, len(b.list)+len(records))
		for i, r := range b.list {
			b.index[r.Key] = i
		}
	}
	for _, r := range records {
		if i, ok := b.index[r.Key]; ok {
			b.list[i].Counts.Add(r.Counts)
			continue
		}
		if len(b.list) >= room {
			dropped.Add(r.Counts)
			continue
		}
		b.index[r.Key] = len(b.list)
		b.list = append(b.list, r)
	}
	return dropped
}

// take hands the buffered flows over and empties the buffer; spare (may be
// nil) becomes the buffer's storage, so two slices alternate.
func (b *buffer) take(spare []flow.Record) []flow.Record {
	out := b.list
	b.list = spare[:0]
	b.index = nil
	return out
}

func (b *buffer) len() int { return len(b.list) + len(b.sealed) }

// seal makes what the buffer holds the part drained up to rels, drained
// at at. While an earlier sealed part is still unsent, the two are merged
// (the server keeps one batch in flight): unordered is then how many of
// the earlier releases have flows in what was drained between the two,
// which the merge puts before their release.
func (b *buffer) seal(rels []wire.Release, at time.Time) (unordered int) {
	if len(b.sealedRel) == 0 {
		b.sealed = append(b.sealed[:0], b.list...)
	} else {
		for _, r := range b.sealedRel {
			if slices.ContainsFunc(b.list, func(f flow.Record) bool { return f.Src == r.Addr || f.Dst == r.Addr }) {
				unordered++
			}
		}
		// add's merge, bounded by what both parts hold already.
		merged := buffer{max: len(b.sealed) + len(b.list), list: b.sealed}
		merged.add(b.list)
		b.sealed = merged.list
	}
	b.list = b.list[:0]
	b.index = nil
	b.sealedRel = append(b.sealedRel, rels...)
	b.sealedAt = at
	return unordered
}

// takeSealed hands the sealed part over, with its releases and drain
// time; ok is false when nothing is sealed.
func (b *buffer) takeSealed() (records []flow.Record, rels []wire.Release, at time.Time, ok bool) {
	if len(b.sealedRel) == 0 {
		return nil, nil, time.Time{}, false
	}
	records, rels, at = b.sealed, b.sealedRel, b.sealedAt
	b.sealed, b.sealedRel = nil, nil
	return records, rels, at, true
}

// peekSealed returns the sealed part's releases and drain time without
// taking them; ok is false when nothing is sealed.
func (b *buffer) peekSealed() (rels []wire.Release, at time.Time, ok bool) {
	return b.sealedRel, b.sealedAt, len(b.sealedRel) > 0
}

// hasSealed reports a sealed part waiting to be sent.
func (b *buffer) hasSealed() bool { return len(b.sealedRel) > 0 }
