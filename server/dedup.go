package server

import (
	"container/list"
	"sync"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
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
// it as applied. The caller must then apply it: claiming first means a
// retry racing with its still-running original is acknowledged, not
// applied twice.
func (d *dedup) claim(node, id string, seq uint64, now time.Time) bool {
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
			return false
		}
		st.seq = seq
		return true
	}
	for len(d.m) >= d.max {
		d.removeLocked(d.ll.Back())
		d.evicted.Inc()
	}
	d.m[k] = d.ll.PushFront(&incState{key: k, seq: seq, seen: now})
	return true
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
