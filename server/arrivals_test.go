package server

import (
	"context"
	"testing"
	"time"
)

// TestArrivals: a decoded request waits for every request that has
// entered by then to record its releases, those that entered after it
// included, not for those entering later; it gives up at the bound (a
// slow sender holds the others up for no longer) or when its context
// ends.
func TestArrivals(t *testing.T) {
	a := newArrivals()
	if !a.waitEntered(context.Background(), time.Minute) {
		t.Error("a wait with no request in the server gave up")
	}
	first, second := a.enter(), a.enter()
	a.recorded(first)
	a.recorded(second)
	if !a.waitEntered(context.Background(), time.Minute) {
		t.Error("the second request waited, every request recorded")
	}

	// The batch enters, then a report while the batch is still being
	// read: once decoded, the batch waits for the report.
	batch, report := a.enter(), a.enter()
	a.recorded(batch)
	if a.waitEntered(context.Background(), time.Millisecond) {
		t.Error("the batch did not wait for the report that entered while it was decoded")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if a.waitEntered(ctx, time.Minute) {
		t.Error("a cancelled request kept waiting")
	}
	a.recorded(report)
	if !a.waitEntered(context.Background(), time.Minute) {
		t.Error("the batch waited, the report recorded")
	}

	// Not for a request that enters once the wait has begun.
	report = a.enter()
	done := make(chan bool)
	go func() { done <- a.waitEntered(context.Background(), time.Minute) }()
	waitUntil(t, "the wait to begin", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.at(report).wake != nil
	})
	later := a.enter()
	a.recorded(batch) // does nothing
	a.recorded(report)
	if !<-done {
		t.Error("the wait gave up, every request entered before it recorded")
	}
	a.recorded(later)
	if n, held := a.open(), len(a.queue)-a.head; n != 0 || held != 0 {
		t.Errorf("%d requests open, %d held, want none", n, held)
	}

	// Many waiting at once, released in any order.
	var seqs []uint64
	for range 1000 {
		seqs = append(seqs, a.enter())
	}
	results := make(chan bool, len(seqs))
	for _, s := range seqs[1:] {
		a.recorded(s)
		go func() { results <- a.waitEntered(context.Background(), time.Minute) }()
	}
	a.recorded(seqs[0])
	for range seqs[1:] {
		if !<-results {
			t.Fatal("a request gave up, every earlier one recorded")
		}
	}
	if n := len(a.queue); n != 0 {
		t.Errorf("queue of %d left, want it compacted to none", n)
	}
}

// open returns the number of requests not recorded yet.
func (a *arrivals) open() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, e := range a.queue[a.head:] {
		if !e.recorded {
			n++
		}
	}
	return n
}
