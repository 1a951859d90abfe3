package resolve

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// logLines returns the JSON log lines with message msg.
func logLines(t *testing.T, out, msg string) []map[string]any {
	t.Helper()
	var lines []map[string]any
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		if m["msg"] == msg {
			lines = append(lines, m)
		}
	}
	return lines
}

// TestSyncErrorAndReport: while the API server refuses to list nodes, the
// resolver says so in SyncError (for /readyz) and in warnings at least the
// report interval apart that name the API server, the resource and the
// error; once the lists succeed, it logs "informers synced" once and stops
// warning.
func TestSyncErrorAndReport(t *testing.T) {
	const (
		apiServer = "https://127.0.0.1:1"
		every     = 100 * time.Millisecond
		msgWait   = "waiting for the Kubernetes API: informers not synced"
	)
	kube := fake.NewClientset(nodeA())
	var refusing atomic.Bool
	refusing.Store(true)
	kube.PrependReactor("list", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		if refusing.Load() {
			return true, nil, errors.New("dial tcp 127.0.0.1:1: connect: connection refused")
		}
		return false, nil, nil
	})
	var logs testutil.SyncBuffer
	r, err := New(Config{ReleasedIPTTL: time.Minute, ReleasedIPCacheSize: 8, APIServer: apiServer},
		kube, slog.New(slog.NewJSONHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	r.reportEvery = every
	if err := r.SyncError(); !errors.Is(err, ErrNotSynced) || err.Error() != ErrNotSynced.Error() {
		t.Errorf("SyncError before Run = %v, want %v alone", err, ErrNotSynced)
	}

	runResolver(t, r)
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second) // a hang guard only
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("gave up waiting for %s; log:\n%s", what, logs.String())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitFor("three warnings", func() bool { return len(logLines(t, logs.String(), msgWait)) >= 3 })

	if err := r.SyncError(); !errors.Is(err, ErrNotSynced) ||
		!strings.Contains(err.Error(), "nodes: failed to list *v1.Node: dial tcp 127.0.0.1:1: connect: connection refused") {
		t.Errorf("SyncError while refused = %v, want the nodes list error", err)
	}
	warnings := logLines(t, logs.String(), msgWait)
	var prev time.Time
	for i, w := range warnings {
		if w["level"] != "WARN" || w["api_server"] != apiServer || w["resource"] != "nodes" ||
			!strings.Contains(w["err"].(string), "connection refused") || w["waited"] == "" {
			t.Errorf("warning %d = %v, want level WARN, api_server %s, resource nodes, the error and waited", i, w, apiServer)
		}
		at, err := time.Parse(time.RFC3339Nano, w["time"].(string))
		if err != nil {
			t.Fatal(err)
		}
		if i > 0 && at.Sub(prev) < every {
			t.Errorf("warning %d came %s after the previous one, want at least %s", i, at.Sub(prev), every)
		}
		prev = at
	}

	refusing.Store(false)
	waitFor("sync after the API server answers", r.HasSynced)
	if err := r.SyncError(); err != nil {
		t.Errorf("SyncError after sync = %v, want nil", err)
	}
	waitFor("the synced log", func() bool { return len(logLines(t, logs.String(), "informers synced")) == 1 })
	if d := logLines(t, logs.String(), "informers synced")[0]["duration"]; d == nil || d == "" {
		t.Errorf("informers synced without a duration: %v", d)
	}
	// No more warnings once synced: three intervals without one. An
	// absence has no event to wait for; the sleep is the window in which a
	// warning would have come.
	n := len(logLines(t, logs.String(), msgWait))
	time.Sleep(3 * every)
	if got := len(logLines(t, logs.String(), msgWait)); got > n {
		t.Errorf("%d warnings after the sync", got-n)
	}
}

// roundTripFunc is an http.RoundTripper from a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestFailuresTransport: the failures client-go retries without telling
// the informers (no answer, 429) are recorded for lists and watches only.
func TestFailuresTransport(t *testing.T) {
	refused := errors.New("dial tcp 127.0.0.1:1: connect: connection refused")
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name         string
		method, url  string
		ctx          context.Context
		status       int   // of the answer, when err is nil
		err          error // of the round trip
		wantResource string
		wantErr      string // "": nothing recorded
	}{
		{name: "watch refused", method: "GET", url: "https://api/api/v1/nodes?watch=true&sendInitialEvents=true", err: refused,
			wantResource: "nodes", wantErr: "watch /api/v1/nodes: dial tcp 127.0.0.1:1: connect: connection refused"},
		{name: "list refused", method: "GET", url: "https://api/apis/apps/v1/replicasets?limit=1", err: refused,
			wantResource: "replicasets", wantErr: "list /apis/apps/v1/replicasets: dial tcp"},
		{name: "list throttled", method: "GET", url: "https://api/api/v1/pods?limit=500", status: http.StatusTooManyRequests,
			wantResource: "pods", wantErr: "list /api/v1/pods: 429 Too Many Requests"},
		{name: "list answered", method: "GET", url: "https://api/api/v1/pods", status: http.StatusOK},
		// The informers report these themselves, with the API's message.
		{name: "list forbidden", method: "GET", url: "https://api/api/v1/pods", status: http.StatusForbidden},
		{name: "not a list", method: "POST", url: "https://api/apis/authentication.k8s.io/v1/tokenreviews", err: refused},
		{name: "given up by the caller", method: "GET", url: "https://api/api/v1/nodes?watch=true", ctx: cancelled, err: refused},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var f Failures
			rt := f.Transport(roundTripFunc(func(*http.Request) (*http.Response, error) {
				if tc.err != nil {
					return nil, tc.err
				}
				return &http.Response{StatusCode: tc.status, Status: fmt.Sprintf("%d %s", tc.status, http.StatusText(tc.status))}, nil
			}))
			ctx := tc.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			req, err := http.NewRequestWithContext(ctx, tc.method, tc.url, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := rt.RoundTrip(req); !errors.Is(err, tc.err) {
				t.Errorf("RoundTrip error %v, want %v passed through", err, tc.err)
			}
			resource, got := f.last()
			switch {
			case tc.wantErr == "" && got != nil:
				t.Errorf("recorded %s: %v, want nothing", resource, got)
			case tc.wantErr != "" && (got == nil || resource != tc.wantResource || !strings.Contains(got.Error(), tc.wantErr)):
				t.Errorf("recorded %s: %v, want %s: %s", resource, got, tc.wantResource, tc.wantErr)
			}
		})
	}
}
