package remotewrite

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestRetry(t *testing.T) {
	final := errors.New("400 bad request")
	retryable := retryableError{err: errors.New("503")}
	for _, tc := range []struct {
		name     string
		results  []error // what each attempt returns; past the end: nil
		wantErr  error
		attempts int
	}{
		{"first attempt succeeds", nil, nil, 1},
		{"final error is not retried", []error{final}, final, 1},
		{"retryable then success", []error{retryable, retryable, retryable}, nil, 4},
		{"retryable then final", []error{retryable, final}, final, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := Backoff{Min: time.Millisecond, Max: 8 * time.Millisecond}
			n := 0
			var waits []time.Duration
			err := Retry(context.Background(), &b, nil, func() error {
				n++
				if n-1 < len(tc.results) {
					return tc.results[n-1]
				}
				return nil
			}, func(_ error, d time.Duration) { waits = append(waits, d) })
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Errorf("err = %v, want %v", err, tc.wantErr)
			}
			if n != tc.attempts {
				t.Errorf("%d attempts, want %d", n, tc.attempts)
			}
			for i := 1; i < len(waits); i++ {
				if waits[i] <= waits[i-1] {
					t.Errorf("waits %v do not grow", waits)
				}
			}
			if b.next != 0 || !b.until.IsZero() {
				t.Errorf("backoff not reset after the loop ended: %+v", b)
			}
		})
	}
}

func TestBackoffWaitsGrowToTheCapWithJitter(t *testing.T) {
	b := Backoff{Min: 10 * time.Millisecond, Max: 80 * time.Millisecond}
	var prev time.Duration
	for i := range 20 {
		d := b.wait(0)
		base := min(10*time.Millisecond<<i, 80*time.Millisecond)
		if d > base || d < base*4/5 {
			t.Errorf("wait %d = %v, want within [%v, %v]", i, d, base*4/5, base)
		}
		if base < b.Max && d <= prev {
			t.Errorf("wait %d = %v did not grow from %v", i, d, prev)
		}
		prev = d
	}
	if d := b.wait(3 * time.Second); d != 3*time.Second {
		t.Errorf("Retry-After 3s gave wait %v", d)
	}
}

func TestRetryStopsOnContextAndOnNewerData(t *testing.T) {
	retryable := func() error { return retryableError{err: errors.New("down"), after: time.Hour} }

	ctx, cancel := context.WithCancel(context.Background())
	b := Backoff{Min: time.Millisecond, Max: time.Hour}
	// Pacing the stimulus, not waiting for anything: cancel while Retry
	// most likely sits in its hour-long wait. Cancelling earlier gives the
	// same answer, so the outcome does not depend on the timing.
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	if err := Retry(ctx, &b, nil, retryable, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled context: err = %v", err)
	}

	newer := make(chan struct{}, 1)
	b = Backoff{Min: time.Millisecond, Max: time.Hour}
	// Pacing the stimulus, as above: newer data during the wait.
	go func() { time.Sleep(20 * time.Millisecond); newer <- struct{}{} }()
	if err := Retry(context.Background(), &b, newer, retryable, nil); !errors.Is(err, errSuperseded) {
		t.Errorf("newer data: err = %v", err)
	}
	// The newer batch inherits the hour-long Retry-After wait.
	if until := time.Until(b.until); until < 59*time.Minute {
		t.Errorf("superseded retry left until %v from now, want the remaining Retry-After", until)
	}
}
