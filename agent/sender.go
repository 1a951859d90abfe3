package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/version"
)

// maxErrBody is how much of a refusal's body is kept for the log.
const maxErrBody = 512

// retryableError is a failed send worth repeating: server errors, 429 and
// transport errors. After, when set, comes from Retry-After.
type retryableError struct {
	err   error
	after time.Duration
}

func (e retryableError) Error() string { return e.err.Error() }
func (e retryableError) Unwrap() error { return e.err }

// poster sends one request body to the server.
type poster struct {
	url       string
	tokenFile string
	client    *http.Client
}

// post sends body and classifies the outcome: nil on 2xx, retryableError
// for 5xx, 429 and transport errors, a plain error (do not resend) for any
// other status. The body of the response is always drained and closed.
func (p *poster) post(ctx context.Context, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.url, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("building request: %w", err)
	}
	req.Header.Set("Content-Type", remotewrite.ContentType)
	req.Header.Set("Content-Encoding", remotewrite.ContentEncoding)
	req.Header.Set(remotewrite.HeaderVersion, remotewrite.ProtocolVersion)
	req.Header.Set("User-Agent", version.UserAgent("agent"))
	if p.tokenFile != "" {
		// Re-read every time: projected tokens are rotated on disk.
		tok, err := os.ReadFile(p.tokenFile)
		if err != nil {
			return retryableError{err: fmt.Errorf("reading token file: %w", err)}
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return retryableError{err: fmt.Errorf("sending batch: %w", err)}
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrBody))
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode/100 == 2 {
		return nil
	}
	err = fmt.Errorf("server answered %s: %s", resp.Status, bytes.TrimSpace(msg))
	if resp.StatusCode/100 == 5 || resp.StatusCode == http.StatusTooManyRequests {
		return retryableError{err: err, after: retryAfter(resp.Header.Get("Retry-After"))}
	}
	return err
}

// retryAfter parses a Retry-After header in seconds or as an HTTP date.
func retryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s > 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(time.Until(t), 0)
	}
	return 0
}

// backoff computes capped exponential delays with full jitter, so that
// agents of a whole cluster do not resend in lockstep after an outage.
type backoff struct {
	min, max time.Duration
	next     time.Duration
}

func (b *backoff) reset() { b.next = b.min }

// delay returns the wait before the next attempt; after (from Retry-After)
// wins when set.
func (b *backoff) delay(after time.Duration) time.Duration {
	if b.next == 0 {
		b.next = b.min
	}
	d := b.next
	b.next = min(2*b.next, b.max)
	if after > 0 {
		return min(after, b.max)
	}
	// Jitter in [d/2, d].
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

// sendWithRetry posts body until it is accepted, refused for good, or ctx
// ends. onRetry is called before every wait.
func sendWithRetry(ctx context.Context, p *poster, b *backoff, body []byte, onRetry func(err error, wait time.Duration)) error {
	b.reset()
	for {
		err := p.post(ctx, body)
		var re retryableError
		if err == nil || !errors.As(err, &re) {
			return err
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		}
		wait := b.delay(re.after)
		onRetry(err, wait)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-t.C:
		}
	}
}
