package resolve

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/tools/cache"
)

// Why the informers have not synced. Client-go retries a failed list or
// watch on its own and says why only at a verbosity nobody runs with or
// in lines that do not name the API server. The resolver keeps the last
// failure so that /readyz can give it, and so that a periodic warning can
// say which API server it is waiting for, since when and what it answered.

// ErrNotSynced is what SyncError wraps until the informers have delivered
// their initial lists.
var ErrNotSynced = errors.New("informers not synced yet")

// errNoFailure stands for the last error while no list or watch has failed
// yet: the lists are still running, or the API server does not answer and
// the client has no timeout to give up with.
var errNoFailure = errors.New("no list or watch has failed yet (still listing, or the API server is not answering)")

// DefaultSyncReportInterval is how long after Run the first "not synced"
// warning comes and how often it repeats: a reachable API server syncs
// well within it, so a healthy start logs nothing, and client-go's retries
// (from 0.8 s, backing off to 30 s) rarely bring anything new sooner.
const DefaultSyncReportInterval = 5 * time.Second

// Failures keeps the last failed list or watch of the resolver's informers.
// Most failures reach it through the informers' watch error handlers. Two
// never do: while streaming the initial list (client-go's watch-list mode)
// a refused connection and a 429 are retried inside client-go without a
// word to the informer. Transport catches those, so give the resolver the
// Failures whose Transport wraps its client's (Config.Failures). The zero
// value is ready to use.
type Failures struct {
	mu       sync.Mutex
	resource string // of the failed request: "pods", "nodes", ...
	err      error  // nil while none failed
}

// record keeps err as the last failure.
func (f *Failures) record(resource string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.resource, f.err = resource, err
}

// last returns the last failure; err is nil if none was recorded.
func (f *Failures) last() (resource string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.resource, f.err
}

// Transport wraps a Kubernetes client's transport (rest.Config.Wrap): GET
// requests, which lists and watches are, that fail to get an answer or get
// 429 Too Many Requests are recorded.
func (f *Failures) Transport(rt http.RoundTripper) http.RoundTripper {
	return failureTransport{rt: rt, f: f}
}

type failureTransport struct {
	rt http.RoundTripper
	f  *Failures
}

func (t failureTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(req)
	if req.Method != http.MethodGet || req.Context().Err() != nil {
		return resp, err // not a list or watch, or given up by the caller
	}
	op := "list"
	if req.URL.Query().Get("watch") == "true" {
		op = "watch"
	}
	// Lists and watches are of collections: the path ends with the
	// resource (/api/v1/nodes, /apis/apps/v1/replicasets).
	resource := req.URL.Path[strings.LastIndexByte(req.URL.Path, '/')+1:]
	switch {
	case err != nil:
		t.f.record(resource, fmt.Errorf("%s %s: %w", op, req.URL.Path, err))
	case resp.StatusCode == http.StatusTooManyRequests:
		t.f.record(resource, fmt.Errorf("%s %s: %s", op, req.URL.Path, resp.Status))
	}
	return resp, err
}

// SyncError returns nil once the informers have synced. Until then it
// returns ErrNotSynced, wrapping the last failed list or watch if any, so
// /readyz can say what the API server answered.
func (r *Resolver) SyncError() error {
	if r.synced.Load() {
		return nil
	}
	resource, err := r.failures.last()
	if err == nil {
		return ErrNotSynced
	}
	return fmt.Errorf("%w: %s: %w", ErrNotSynced, resource, err)
}

// informer is the part of cache.SharedIndexInformer that watchErrors needs.
type informer interface {
	SetWatchErrorHandlerWithContext(cache.WatchErrorHandlerWithContext) error
}

// watchErrors makes inf record its failed lists and watches, then log them
// as client-go does by default (after the sync too: a watch that keeps
// failing later is worth a line). It must be called before the informer
// starts.
func (r *Resolver) watchErrors(inf informer, resource string) error {
	err := inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, refl *cache.Reflector, err error) {
		r.failures.record(resource, err)
		cache.DefaultWatchErrorHandler(ctx, refl, err)
	})
	if err != nil {
		return fmt.Errorf("setting %s watch error handler: %w", resource, err)
	}
	return nil
}

// reportUnsynced warns every interval, until the informers have synced or
// ctx ends, that the resolver is still waiting for the API server and
// why. Warnings are at least interval apart however often lists fail.
func (r *Resolver) reportUnsynced(ctx context.Context, start time.Time, interval time.Duration) {
	t := time.NewTimer(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if r.synced.Load() {
			return
		}
		resource, err := r.failures.last()
		if err == nil {
			err = errNoFailure
		}
		r.log.Warn("waiting for the Kubernetes API: informers not synced",
			"api_server", r.cfg.APIServer, "resource", resource, "err", err,
			"waited", time.Since(start).Round(time.Millisecond).String())
		t.Reset(interval)
	}
}
