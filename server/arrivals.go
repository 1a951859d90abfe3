package server

import (
	"context"
	"sync"
	"time"
)

// releaseOrderWait bounds how long a batch waits for the requests that
// reached the handler before it to record their releases (arrivals): long
// enough for a request already in the server to be read and decoded
// while the server's core is busy, short enough that an agent sending its
// body slowly cannot hold the others up for long.
const releaseOrderWait = 50 * time.Millisecond

// arrivals orders the releases agents report before the flows of other
// agents' batches that came after them. Node A's report that a pod's
// address was released and node B's batch with flows to the address's
// next pod can both be in the server at once (A's sent first); resolved
// in the wrong order, B's flows go to the released pod while the informer
// still shows it. So requests are numbered as they enter the handler,
// and a batch resolves its flows once every request numbered before it
// has recorded its releases (or was refused), or after releaseOrderWait.
type arrivals struct {
	mu   sync.Mutex
	next uint64
	// open are the requests that entered and have not recorded their
	// releases yet; changed is closed when one leaves it.
	open    map[uint64]struct{}
	changed chan struct{}
}

func newArrivals() *arrivals {
	return &arrivals{open: map[uint64]struct{}{}, changed: make(chan struct{})}
}

// enter numbers a request that reached the handler.
func (a *arrivals) enter() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.next++
	a.open[a.next] = struct{}{}
	return a.next
}

// recorded marks request seq's releases recorded (or the request
// refused). Calling it again does nothing.
func (a *arrivals) recorded(seq uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.open[seq]; !ok {
		return
	}
	delete(a.open, seq)
	close(a.changed)
	a.changed = make(chan struct{})
}

// waitEarlier waits until no request numbered before seq is open, for at
// most bound or until ctx ends, and reports whether it did not have to
// give up.
func (a *arrivals) waitEarlier(ctx context.Context, seq uint64, bound time.Duration) bool {
	var timeout <-chan time.Time
	for {
		a.mu.Lock()
		earlier := false
		for s := range a.open {
			if s < seq {
				earlier = true
				break
			}
		}
		changed := a.changed
		a.mu.Unlock()
		if !earlier {
			return true
		}
		if timeout == nil {
			t := time.NewTimer(bound)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-changed:
		case <-timeout:
			return false
		case <-ctx.Done():
			return false
		}
	}
}
