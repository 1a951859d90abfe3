package agent

import (
	"github.com/kubezonnet/kubezonnet/internal/flow"
)

// buffer merges drained flows that are not sent yet. It is bounded by flow
// count, not by time: a flow seen again only adds to its counts, so an
// hour-long server outage costs no bytes and no more memory than max flows.
// When full, a new flow is refused and its counts are returned to the
// caller to be counted as dropped.
type buffer struct {
	max   int
	flows map[flow.Key]flow.Counts
}

func newBuffer(max int) *buffer {
	return &buffer{max: max, flows: make(map[flow.Key]flow.Counts)}
}

// add merges records and returns what did not fit.
func (b *buffer) add(records []flow.Record) (dropped flow.Counts) {
	for _, r := range records {
		c, ok := b.flows[r.Key]
		if !ok && len(b.flows) >= b.max {
			dropped.Add(r.Counts)
			continue
		}
		c.Add(r.Counts)
		b.flows[r.Key] = c
	}
	return dropped
}

// take moves every buffered flow into dst (reused) and empties the buffer.
func (b *buffer) take(dst []flow.Record) []flow.Record {
	dst = dst[:0]
	for k, c := range b.flows {
		dst = append(dst, flow.Record{Key: k, Counts: c})
	}
	clear(b.flows)
	return dst
}

func (b *buffer) len() int { return len(b.flows) }
