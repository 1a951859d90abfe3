package remotewrite

import (
	"testing"
	"time"
)

// TestBackoffScheduleByAttempt tables the wait computed after each failed
// attempt: the base doubles from Min up to Max, jitter only shortens it
// (by at most 20%), a Retry-After replaces it without slowing the
// doubling, and a success starts over from Min. Values, not clocks.
func TestBackoffScheduleByAttempt(t *testing.T) {
	const ms = time.Millisecond
	for _, tc := range []struct {
		name     string
		min, max time.Duration
		// retryAfter per attempt (zero: none); base is the expected base
		// delay, exact when retryAfter is given.
		retryAfter []time.Duration
		base       []time.Duration
	}{
		{"doubles to the cap", 100 * ms, 2 * time.Second, make([]time.Duration, 7),
			[]time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, 1600 * ms, 2 * time.Second, 2 * time.Second}},
		{"min equals max", time.Second, time.Second, make([]time.Duration, 3),
			[]time.Duration{time.Second, time.Second, time.Second}},
		{"cap not a power of two of min", 30 * ms, 100 * ms, make([]time.Duration, 4),
			[]time.Duration{30 * ms, 60 * ms, 100 * ms, 100 * ms}},
		{"Retry-After wins, and the base keeps doubling", 100 * ms, 10 * time.Second,
			[]time.Duration{0, 5 * time.Second, 0, 50 * ms},
			[]time.Duration{100 * ms, 5 * time.Second, 400 * ms, 50 * ms}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Jitter is random: each schedule is checked many times.
			for range 200 {
				b := Backoff{Min: tc.min, Max: tc.max}
				for i, base := range tc.base {
					d := b.wait(tc.retryAfter[i])
					lo := base * 4 / 5
					if tc.retryAfter[i] > 0 {
						lo = base
					}
					if d < lo || d > base {
						t.Fatalf("attempt %d: wait %v, want within [%v, %v]", i, d, lo, base)
					}
				}
			}
		})
	}
	t.Run("a success starts over", func(t *testing.T) {
		b := Backoff{Min: 100 * ms, Max: time.Second}
		for range 5 {
			b.wait(0)
		}
		b.reset()
		if d := b.wait(0); d < 80*ms || d > 100*ms {
			t.Errorf("first wait after a reset = %v, want within [80ms, 100ms]", d)
		}
	})
}
