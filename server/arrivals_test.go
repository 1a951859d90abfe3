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
	if !a.waitEarlier(context.Background(), first, time.Minute) {
		t.Error("the first request waited for later ones")
	}
	if a.waitEarlier(context.Background(), third, time.Millisecond) {
		t.Error("the third request did not wait for the first two")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if a.waitEarlier(ctx, third, time.Minute) {
		t.Error("a cancelled request kept waiting")
	}
	done := make(chan bool)
	go func() { done <- a.waitEarlier(context.Background(), third, time.Minute) }()
	a.recorded(first)
	a.recorded(first) // does nothing
	a.recorded(second)
	if !<-done {
		t.Error("the third request gave up, the first two recorded")
	}
	if len(a.open) != 0 {
		t.Errorf("%d requests open, want none", len(a.open))
	}
}
