package server

import (
	"context"
	"sync"
	"time"
)

// releaseOrderWait bounds how long a batch waits for the requests that
// reached the handler before it was decoded to record their releases
// (arrivals): long enough for a request already in the server to be read
// and decoded while the server's core is busy, short enough that an agent
// sending its body slowly cannot hold the others up for long.
const releaseOrderWait = 50 * time.Millisecond

// arrivals orders the releases agents report before the flows of other
// agents' batches that came after them. Node A's report that a pod's
// address was released and node B's batch with flows to the address's
// next pod can both be in the server at once (A's sent first); resolved
// in the wrong order, B's flows go to the released pod while the informer
// still shows it. So requests are numbered as they enter the handler,
// and a batch, once decoded, resolves its flows when every request that
// had entered by then has recorded its releases (or was refused), or
// after releaseOrderWait. By then, not by the batch's own entry: requests
// that became readable together enter in any order, and A's small report
// can enter while B's larger body is still being read and decoded.
//
// The requests are a queue in order of entry: the front is the oldest
// not recorded yet, and a request leaves once it and all before it have
// recorded. Each one is woken once, however many wait (agents
// resending all at once after a restart).
type arrivals struct {
	mu   sync.Mutex
	next uint64
	// From head on: entered, not yet at the front with all before
	// recorded. Requests leave from the front only, so these are
	// consecutive numbers, and a number's place is found by arithmetic.
	queue []*arrival
	head  int
}

type arrival struct {
	seq      uint64
	recorded bool
	wake     chan struct{} // closed when it leaves the queue; nil: no one waits
}

func newArrivals() *arrivals { return &arrivals{} }

// at returns request seq while it is in the queue, nil once it has left.
// Callers hold mu.
func (a *arrivals) at(seq uint64) *arrival {
	if a.head == len(a.queue) {
		return nil
	}
	first := a.queue[a.head].seq
	if seq < first || seq-first >= uint64(len(a.queue)-a.head) {
		return nil
	}
	return a.queue[a.head+int(seq-first)]
}

// enter numbers a request that reached the handler.
func (a *arrivals) enter() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.next++
	e := &arrival{seq: a.next}
	a.queue = append(a.queue, e)
	return e.seq
}

// recorded marks request seq's releases recorded (or the request
// refused). Calling it again does nothing.
func (a *arrivals) recorded(seq uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.at(seq)
	if e == nil || e.recorded {
		return
	}
	e.recorded = true
	for a.head < len(a.queue) && a.queue[a.head].recorded {
		f := a.queue[a.head]
		a.queue[a.head] = nil
		a.head++
		if f.wake != nil {
			close(f.wake)
		}
	}
	if a.head == len(a.queue) || a.head > len(a.queue)/2 {
		n := copy(a.queue, a.queue[a.head:])
		clear(a.queue[n:])
		a.queue, a.head = a.queue[:n], 0
	}
}

// waitEntered waits until every request that has entered so far has
// recorded its releases (the caller's own included: it calls once it has
// recorded), for at most bound or until ctx ends, and reports whether it
// did not have to give up.
func (a *arrivals) waitEntered(ctx context.Context, bound time.Duration) bool {
	a.mu.Lock()
	if a.head == len(a.queue) {
		a.mu.Unlock()
		return true // every request entered has left the queue
	}
	// The newest leaves the queue last, when all before it have too.
	e := a.queue[len(a.queue)-1]
	if e.wake == nil {
		e.wake = make(chan struct{})
	}
	wake := e.wake
	a.mu.Unlock()
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case <-wake:
		return true
	case <-t.C:
	case <-ctx.Done():
	}
	return false
}
