package remotewrite

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"
)

// retryableError marks a failed attempt worth repeating: a network error,
// a 5xx, or a 429 (when enabled). after is the receiver's Retry-After, zero
// when it gave none.
type retryableError struct {
	err   error
	after time.Duration
}

func (e retryableError) Error() string { return e.err.Error() }
func (e retryableError) Unwrap() error { return e.err }

// errSuperseded ends a retry loop because a newer snapshot arrived for the
// same shard: values are cumulative, so the newer one carries everything
// the abandoned request carried.
var errSuperseded = errors.New("superseded by a newer snapshot")

// IsSuperseded reports whether Retry gave up because newer was signalled.
func IsSuperseded(err error) bool { return errors.Is(err, errSuperseded) }

// Backoff is a retry schedule: capped exponential delays with jitter. The
// pusher keeps one per shard, for as long as the shard lives, so that an
// endpoint that stays down keeps being tried at a growing interval even as
// newer snapshots replace the request being retried; the agent keeps one
// for its batches.
type Backoff struct {
	Min, Max time.Duration
	// next is the base delay of the next wait; zero after a success.
	next time.Duration
	// until is when the next attempt may start; a superseding snapshot
	// inherits it, so Retry-After is honoured across snapshots.
	until time.Time
}

// wait returns the delay after a failure: the receiver's Retry-After if
// it gave one, else the current base delay minus up to 20% jitter. The
// base doubles up to max. Jitter only ever shortens a wait, so consecutive
// waits still strictly grow (0.8b..b, then 1.6b..2b) until the cap.
func (b *Backoff) wait(retryAfter time.Duration) time.Duration {
	if b.next == 0 {
		b.next = b.Min
	}
	d := b.next - time.Duration(rand.Int64N(int64(b.next)/5+1))
	b.next = min(2*b.next, b.Max)
	if retryAfter > 0 {
		d = retryAfter
	}
	return d
}

// reset forgets the failures after a success.
func (b *Backoff) reset() {
	b.next = 0
	b.until = time.Time{}
}

// Retry calls send until it succeeds or fails finally (an error that is
// not retryable, such as a *StatusError), waiting between attempts as b
// says. It returns ctx's error when ctx ends and, when newer is not nil
// and is signalled during a wait, an error for which IsSuperseded is true.
// onRetry, if not nil, is called after every retryable failure with the
// coming wait.
func Retry(ctx context.Context, b *Backoff, newer <-chan struct{}, send func() error, onRetry func(err error, wait time.Duration)) error {
	for {
		if d := time.Until(b.until); d > 0 {
			t := time.NewTimer(d)
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-newer:
				t.Stop()
				return errSuperseded
			case <-t.C:
			}
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		err := send()
		var re retryableError
		if err == nil {
			b.reset()
			return nil
		}
		if !errors.As(err, &re) {
			// A final answer says nothing about the endpoint's health
			// except that it is up, so the backoff starts over.
			b.reset()
			return err
		}
		d := b.wait(re.after)
		b.until = time.Now().Add(d)
		if onRetry != nil {
			onRetry(err, d)
		}
	}
}
