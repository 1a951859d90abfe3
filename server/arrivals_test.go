package server

import (
	"context"
	"testing"
	"time"
)

// TestArrivals: a request waits for those that entered before it to
// record their releases, not for later ones, and gives up at the bound
// (a slow sender holds the others up for no longer) or when its context
// ends.
func TestArrivals(t *testing.T) {
	a := newArrivals()
	first, second, third := a.enter(), a.enter(), a.enter()
	a.recorded(third)
	a.recorded(first)
	if !a.waitEarlier(context.Background(), first, time.Minute) {
		t.Error("the first request waited for later ones")
	}
	if a.waitEarlier(context.Background(), third, time.Millisecond) {
		t.Error("the third request did not wait for the second")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if a.waitEarlier(ctx, third, time.Minute) {
		t.Error("a cancelled request kept waiting")
	}
	done := make(chan bool)
	go func() { done <- a.waitEarlier(context.Background(), third, time.Minute) }()
	a.recorded(first) // does nothing
	a.recorded(second)
	if !<-done {
		t.Error("the third request gave up, the first two recorded")
	}
	if n := a.open(); n != 0 || len(a.bySeq) != 0 {
		t.Errorf("%d requests open, %d held, want none", n, len(a.bySeq))
	}
	// Many waiting at once, released in any order.
	var seqs []uint64
	for range 1000 {
		seqs = append(seqs, a.enter())
	}
	results := make(chan bool, len(seqs))
	for _, s := range seqs[1:] {
		a.recorded(s)
		go func() { results <- a.waitEarlier(context.Background(), s, time.Minute) }()
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
