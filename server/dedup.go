package server

import (
	"container/list"
	"sync"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/server/aggregate"
)

// dedup enforces the wire contract's exactly-once rule: per agent node and
// incarnation it remembers the highest batch seq applied, and claims only
// batches above it. Memory is bounded twice: incarnations not heard from
// for ttl are forgotten (an agent that restarted has a new one), and at
// most max are kept, least recently seen evicted first.
type dedup struct {
	ttl time.Duration
	max int

	mu sync.Mutex
	m  map[incarnation]*list.Element
	ll *list.List // front: most recently seen

	duplicates *metrics.Counter
	evicted    *metrics.Counter
}

// incarnation identifies one run of one agent.
type incarnation struct {
	node, id string
}

type incState struct {
	key  incarnation
	seq  uint64
	seen time.Time
	// logged is the highest seq whose record is in the journal (under
	// the aggregator's lock): what a checkpoint may remember as applied.
	logged uint64
	// last is the ticket of the batch that claimed seq: its retries wait
	// on it before they are acknowledged.
	last *ticket
}

// ticket tracks a claimed batch until its effect is applied and handed to
// the journal: a retry of it (claimed by the original) must not be
// acknowledged before the original's record is durable.
type ticket struct {
	done chan struct{} // closed once pos is set
	pos  uint64        // journal position of the batch's record (0: none)
}

// applied records the journal position of a claimed batch and releases
// its retries.
func (t *ticket) applied(pos uint64) {
	t.pos = pos
	close(t.done)
}

func newDedup(ttl time.Duration, max int, reg *metrics.Registry) *dedup {
	d := &dedup{
		ttl: ttl,
		max: max,
		m:   map[incarnation]*list.Element{},
		ll:  list.New(),
		duplicates: reg.Counter("kubezonnet_server_duplicate_batches_total",
			"Batches acknowledged without being applied because their seq was already applied (agent retries)."),
		evicted: reg.Counter("kubezonnet_server_incarnations_evicted_total",
			"Agent incarnations forgotten before their TTL because --max-agent-incarnations was reached."),
	}
	reg.GaugeFunc("kubezonnet_server_incarnations", "Agent incarnations whose last applied batch is remembered.",
		func() float64 {
			d.mu.Lock()
			defer d.mu.Unlock()
			return float64(len(d.m))
		})
	return d
}

// claim reports whether the batch (node, id, seq) is new, and if so records
// it as claimed and returns its ticket, on which the caller must call
// applied once the batch is applied. Claiming first means a retry racing
// with its still-running original is acknowledged, not applied twice. For
// a batch already claimed it returns false and the ticket of the latest
// batch of the incarnation (nil if none is known), which the caller waits
// on before acknowledging: a retry is acknowledged only once what it
// repeats is as durable as the original's acknowledgement would be.
func (d *dedup) claim(node, id string, seq uint64, now time.Time) (*ticket, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.expireLocked(now)
	k := incarnation{node, id}
	if e, ok := d.m[k]; ok {
		st := e.Value.(*incState)
		st.seen = now
		d.ll.MoveToFront(e)
		if seq <= st.seq {
			d.duplicates.Inc()
			return st.last, false
		}
		st.seq = seq
		st.last = &ticket{done: make(chan struct{})}
		return st.last, true
	}
	for len(d.m) >= d.max {
		d.removeLocked(d.ll.Back())
		d.evicted.Inc()
	}
	t := &ticket{done: make(chan struct{})}
	d.m[k] = d.ll.PushFront(&incState{key: k, seq: seq, seen: now, last: t})
	return t, true
}

// logged records that batch id's record is in the journal; called under
// the aggregator's lock, so a checkpoint's copy of the table (taken under
// that lock too) holds exactly the batches its counters hold.
func (d *dedup) logged(id *aggregate.BatchID) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e, ok := d.m[incarnation{id.Node, id.Incarnation}]; ok {
		st := e.Value.(*incState)
		st.logged = max(st.logged, id.Seq)
	}
}

// appliedBatch is one incarnation's last applied batch, as checkpoints
// keep it.
type appliedBatch struct {
	node, incarnation string
	seq               uint64
	seen              time.Time
}

// loggedBatches returns the incarnations whose batches are in the journal.
func (d *dedup) loggedBatches() []appliedBatch {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]appliedBatch, 0, len(d.m))
	for e := d.ll.Back(); e != nil; e = e.Prev() {
		st := e.Value.(*incState)
		if st.logged > 0 {
			out = append(out, appliedBatch{st.key.node, st.key.id, st.logged, st.seen})
		}
	}
	return out
}

// restore records batches applied before a restart (from the checkpoint
// and the replayed journal): their retries are duplicates.
func (d *dedup) restore(b appliedBatch, now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	k := incarnation{b.node, b.incarnation}
	if e, ok := d.m[k]; ok {
		st := e.Value.(*incState)
		st.seq = max(st.seq, b.seq)
		st.logged = max(st.logged, b.seq)
		if b.seen.After(st.seen) {
			st.seen = b.seen
		}
		d.ll.MoveToFront(e)
		return
	}
	if b.seen.Before(now.Add(-d.ttl)) {
		return
	}
	for len(d.m) >= d.max {
		d.removeLocked(d.ll.Back())
		d.evicted.Inc()
	}
	d.m[k] = d.ll.PushFront(&incState{key: k, seq: b.seq, logged: b.seq, seen: b.seen})
}

// expireLocked drops incarnations idle for longer than ttl; the list is in
// order of last use, so it stops at the first live one.
func (d *dedup) expireLocked(now time.Time) {
	cutoff := now.Add(-d.ttl)
	for e := d.ll.Back(); e != nil; e = d.ll.Back() {
		if !e.Value.(*incState).seen.Before(cutoff) {
			return
		}
		d.removeLocked(e)
	}
}

func (d *dedup) removeLocked(e *list.Element) {
	delete(d.m, e.Value.(*incState).key)
	d.ll.Remove(e)
}
