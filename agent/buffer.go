package agent

import (
	"github.com/kubezonnet/kubezonnet/internal/flow"
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
type buffer struct {
	max   int
	list  []flow.Record
	index map[flow.Key]int
}

func newBuffer(max int) *buffer {
	return &buffer{max: max}
}

// add merges records (each key at most once, as a drain returns them) and
// returns what did not fit.
func (b *buffer) add(records []flow.Record) (dropped flow.Counts) {
	if len(b.list) == 0 {
		n := min(len(records), b.max)
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
		if len(b.list) >= b.max {
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

func (b *buffer) len() int { return len(b.list) }
