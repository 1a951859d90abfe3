package remotewrite

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
	"github.com/prometheus/prometheus/prompb"
)

// ---- test receiver --------------------------------------------------------

// received is one request as the receiver saw it.
type received struct {
	at     time.Time
	header http.Header
	series []prompb.TimeSeries
}

// testReceiver is an httptest remote-write endpoint that checks the
// protocol on every request (headers, snappy, protobuf decoded with prompb
// as the reference, label order, no duplicate series) and answers as
// respond says for the n-th request (0-based).
type testReceiver struct {
	t       *testing.T
	srv     *httptest.Server
	respond func(n int, w http.ResponseWriter) // nil: 204
	// judge, if set, answers instead of respond, seeing the request's
	// series: a receiver that rejects by content.
	judge func(series []prompb.TimeSeries, w http.ResponseWriter)

	mu   sync.Mutex
	reqs []received
}

func newTestReceiver(t *testing.T, respond func(n int, w http.ResponseWriter)) *testReceiver {
	t.Helper()
	return startReceiver(t, &testReceiver{t: t, respond: respond})
}

// newJudgingReceiver returns a receiver that answers as judge says.
func newJudgingReceiver(t *testing.T, judge func(series []prompb.TimeSeries, w http.ResponseWriter)) *testReceiver {
	t.Helper()
	return startReceiver(t, &testReceiver{t: t, judge: judge})
}

func startReceiver(t *testing.T, r *testReceiver) *testReceiver {
	t.Helper()
	r.srv = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *testReceiver) url() string { return r.srv.URL + "/api/v1/write" }

func (r *testReceiver) serve(w http.ResponseWriter, req *http.Request) {
	at := time.Now()
	series := checkRequest(r.t, req)
	r.mu.Lock()
	n := len(r.reqs)
	r.reqs = append(r.reqs, received{at: at, header: req.Header.Clone(), series: series})
	r.mu.Unlock()
	if r.judge != nil {
		r.judge(series, w)
		return
	}
	if r.respond == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	r.respond(n, w)
}

func (r *testReceiver) requests() []received {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.reqs)
}

// checkRequest validates one remote-write 1.0 request and returns its series.
func checkRequest(t *testing.T, req *http.Request) []prompb.TimeSeries {
	t.Helper()
	if req.Method != http.MethodPost {
		t.Errorf("method %s, want POST", req.Method)
	}
	for h, want := range map[string]string{
		"Content-Encoding":                  "snappy",
		"Content-Type":                      "application/x-protobuf",
		"X-Prometheus-Remote-Write-Version": "0.1.0",
	} {
		if got := req.Header.Get(h); got != want {
			t.Errorf("header %s = %q, want %q", h, got, want)
		}
	}
	if ua := req.Header.Get("User-Agent"); !strings.HasPrefix(ua, "kubezonnet-server/") {
		t.Errorf("User-Agent %q, want kubezonnet-server/...", ua)
	}
	raw, _, err := testutil.ReadSnappy(req.Body)
	if err != nil {
		t.Error(err)
		return nil
	}
	var wr prompb.WriteRequest
	if err := wr.Unmarshal(raw); err != nil {
		t.Errorf("prompb unmarshal: %v", err)
		return nil
	}
	seen := map[string]bool{}
	for _, ts := range wr.Timeseries {
		key := labelString(ts.Labels)
		if seen[key] {
			t.Errorf("series %s twice in one request", key)
		}
		seen[key] = true
		if len(ts.Labels) == 0 || ts.Labels[0].Name != "__name__" {
			t.Errorf("series %s: __name__ is not the first label", key)
		}
		for i := 1; i < len(ts.Labels); i++ {
			if i > 1 && ts.Labels[i-1].Name >= ts.Labels[i].Name {
				t.Errorf("series %s: labels not sorted by name", key)
			}
			if ts.Labels[i].Value == "" {
				t.Errorf("series %s: empty label value", key)
			}
		}
		// One sample, or a created-timestamp zero before it.
		switch n := len(ts.Samples); {
		case n == 2:
			if z, s := ts.Samples[0], ts.Samples[1]; z.Value != 0 || z.Timestamp >= s.Timestamp {
				t.Errorf("series %s: samples %v, want a zero strictly before the sample", key, ts.Samples)
			}
		case n != 1:
			t.Errorf("series %s: %d samples, want 1 (2 with a created-timestamp zero)", key, n)
		}
	}
	return wr.Timeseries
}

func labelString(ls []prompb.Label) string {
	var b strings.Builder
	for _, l := range ls {
		fmt.Fprintf(&b, "%s=%q,", l.Name, l.Value)
	}
	return b.String()
}

// ---- test source ----------------------------------------------------------

// testSource is a mutable set of series standing in for the server's
// aggregates, which are another engineer's package.
type testSource struct {
	mu     sync.Mutex
	series map[string]Series // by labelKey
	calls  int
	// onCall, if set, runs under the lock at each snapshot (e.g. to grow
	// counters once per push).
	onCall func(s *testSource)
}

func newTestSource() *testSource { return &testSource{series: map[string]Series{}} }

func metricKey(ls []metrics.Label) string {
	var b strings.Builder
	for _, l := range ls {
		fmt.Fprintf(&b, "%s=%q,", l.Name, l.Value)
	}
	return b.String()
}

// podPair builds a contract-shaped pod-pair series (labels sorted).
func podPair(name, srcPod, dstPod string) []metrics.Label {
	ls := []metrics.Label{
		{Name: "class", Value: "cross-zone"},
		{Name: "dst_kind", Value: "pod"}, {Name: "dst_namespace", Value: "shop"},
		{Name: "dst_pod", Value: dstPod}, {Name: "dst_workload", Value: "db"},
		{Name: "dst_workload_kind", Value: "StatefulSet"}, {Name: "dst_zone", Value: "zone-b"},
		{Name: "src_kind", Value: "pod"}, {Name: "src_namespace", Value: "shop"},
		{Name: "src_pod", Value: srcPod}, {Name: "src_workload", Value: "api"},
		{Name: "src_workload_kind", Value: "Deployment"}, {Name: "src_zone", Value: "zone-a"},
	}
	return append([]metrics.Label{{Name: "__name__", Value: name}}, ls...)
}

func (s *testSource) set(ls []metrics.Label, v float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.series[metricKey(ls)] = Series{Labels: ls, Value: v}
}

func (s *testSource) add(ls []metrics.Label, v float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := metricKey(ls)
	old := s.series[k]
	s.series[k] = Series{Labels: ls, Value: old.Value + v}
}

func (s *testSource) remove(ls []metrics.Label) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.series, metricKey(ls))
}

func (s *testSource) value(ls []metrics.Label) float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.series[metricKey(ls)].Value
}

func (s *testSource) callCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}

func (s *testSource) AppendSeries(dst []Series) []Series {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls++
	if s.onCall != nil {
		s.onCall(s)
	}
	for _, se := range s.series {
		dst = append(dst, se)
	}
	return dst
}

// ---- helpers ----------------------------------------------------------------

func testConfig(urls ...string) PusherConfig {
	cfg := DefaultPusherConfig()
	cfg.Interval = time.Hour // tests call Push unless they test Run
	cfg.MinBackoff = 20 * time.Millisecond
	cfg.MaxBackoff = 500 * time.Millisecond
	for _, u := range urls {
		cfg.Endpoints = append(cfg.Endpoints, EndpointConfig{URL: u, Timeout: 5 * time.Second})
	}
	return cfg
}

// runPusher runs p.Run in the background until the returned stop is
// called or the test ends; stop returns once Run has.
func runPusher(t *testing.T, p *Pusher) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return stop
}

func newTestPusher(t *testing.T, cfg PusherConfig, reg *metrics.Registry, log *slog.Logger, srcs ...Source) *Pusher {
	t.Helper()
	p, err := NewPusher(cfg, srcs, reg, log)
	if err != nil {
		t.Fatalf("NewPusher: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_ = p.Flush(ctx)
	})
	return p
}

func pushAndWait(t *testing.T, p *Pusher) {
	t.Helper()
	p.Push()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatal(err)
	}
}

// metricValue reads one self-metric series from reg; labels are matched
// as a subset.
func metricValue(_ testing.TB, reg *metrics.Registry, name string, labels ...string) float64 {
	found := math.NaN()
	reg.Each(func(n string, ls []metrics.Label, v float64) {
		if n != name {
			return
		}
		for i := 0; i < len(labels); i += 2 {
			if !slices.Contains(ls, metrics.Label{Name: labels[i], Value: labels[i+1]}) {
				return
			}
		}
		found = v
	})
	return found
}

// eventually polls cond until it holds or the deadline passes. The
// deadline only bounds a hang; no test asserts how fast anything is.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond) // the poll interval
	}
}

// retryWaits returns the waits a pusher logged before its retries (the
// "wait" of its JSON log records), in order.
func retryWaits(t *testing.T, logs string) []time.Duration {
	t.Helper()
	var out []time.Duration
	for _, line := range strings.Split(strings.TrimSpace(logs), "\n") {
		var rec struct {
			Wait *time.Duration `json:"wait"`
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if rec.Wait != nil {
			out = append(out, *rec.Wait)
		}
	}
	return out
}

// ---- tests ------------------------------------------------------------------

func TestPusherSendsEverySeriesWithHeadersAndLabels(t *testing.T) {
	rcv := newTestReceiver(t, nil)
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig()
	cfg.Endpoints = []EndpointConfig{{URL: rcv.url(), BearerTokenFile: tokenFile,
		Headers: map[string]string{"X-Scope-OrgID": "team-a"}}}
	cfg.ExternalLabels = []metrics.Label{{Name: "cluster", Value: "prod"}, {Name: "src_zone", Value: "must-not-override"}}
	cfg.HA = HAConfig{Cluster: "prod-ha", Replica: "kubezonnet-0"}
	cfg.MaxSeriesPerRequest = 3 // force several requests
	cfg.Shards = 2

	src := newTestSource()
	want := map[string]float64{}
	for i := range 10 {
		ls := podPair("kubezonnet_pod_pair_bytes_total", fmt.Sprintf("api-%d", i), "db-0")
		src.set(ls, float64(1000*i+7))
	}
	// A second source returning one series of the first again: sent once.
	dup := podPair("kubezonnet_pod_pair_bytes_total", "api-3", "db-0")
	src2 := SourceFunc(func(dst []Series) []Series { return append(dst, Series{Labels: dup, Value: 3007}) })
	for _, s := range src.AppendSeries(nil) {
		want[s.Labels[10].Value] = s.Value // src_pod
	}
	reg := metrics.New()
	p := newTestPusher(t, cfg, reg, nil, src, src2)
	pushAndWait(t, p)

	reqs := rcv.requests()
	if len(reqs) < 4 {
		t.Fatalf("got %d requests, want at least 4 (10 series, at most 3 per request)", len(reqs))
	}
	got := map[string]float64{}
	stamps := map[int64]bool{}
	for _, r := range reqs {
		if h := r.header.Get("X-Scope-OrgID"); h != "team-a" {
			t.Errorf("X-Scope-OrgID = %q", h)
		}
		if h := r.header.Get("Authorization"); h != "Bearer s3cret" {
			t.Errorf("Authorization = %q", h)
		}
		if len(r.series) > 3 {
			t.Errorf("request with %d series, max 3", len(r.series))
		}
		for _, ts := range r.series {
			if testutil.LabelValue(ts.Labels, "cluster") != "prod-ha" || testutil.LabelValue(ts.Labels, "__replica__") != "kubezonnet-0" {
				t.Errorf("series %s lacks HA labels", labelString(ts.Labels))
			}
			if testutil.LabelValue(ts.Labels, "src_zone") != "zone-a" {
				t.Errorf("external label overrode series label: %s", labelString(ts.Labels))
			}
			pod := testutil.LabelValue(ts.Labels, "src_pod")
			if _, dup := got[pod]; dup {
				t.Errorf("series of %s sent twice in one push", pod)
			}
			got[pod] = ts.Samples[0].Value
			stamps[ts.Samples[0].Timestamp] = true
		}
	}
	if len(got) != len(want) {
		t.Errorf("got %d series, want %d", len(got), len(want))
	}
	for pod, v := range want {
		if got[pod] != v {
			t.Errorf("%s: got %v, want %v", pod, got[pod], v)
		}
	}
	if len(stamps) != 1 {
		t.Errorf("one push carried %d timestamps, want 1", len(stamps))
	}
	if v := metricValue(t, reg, "kubezonnet_server_remote_write_samples_total", "result", "sent"); v != 10 {
		t.Errorf("samples sent = %v, want 10", v)
	}
	if v := metricValue(t, reg, "kubezonnet_server_remote_write_duplicate_series_total"); v != 1 {
		t.Errorf("duplicates = %v, want 1", v)
	}
}

func TestPusherStaleMarkerOnce(t *testing.T) {
	rcv := newTestReceiver(t, nil)
	src := newTestSource()
	a := podPair("kubezonnet_pod_pair_bytes_total", "api-0", "db-0")
	b := podPair("kubezonnet_pod_pair_bytes_total", "api-1", "db-0")
	src.set(a, 10)
	src.set(b, 20)
	p := newTestPusher(t, testConfig(rcv.url()), nil, nil, src)
	pushAndWait(t, p)
	src.remove(b)
	pushAndWait(t, p)
	pushAndWait(t, p)

	// pushes[i][src_pod] = values seen in push i (by timestamp order).
	byTS := map[int64]map[string]float64{}
	for _, r := range rcv.requests() {
		for _, ts := range r.series {
			m := byTS[ts.Samples[0].Timestamp]
			if m == nil {
				m = map[string]float64{}
				byTS[ts.Samples[0].Timestamp] = m
			}
			m[testutil.LabelValue(ts.Labels, "src_pod")] = ts.Samples[0].Value
		}
	}
	stamps := make([]int64, 0, len(byTS))
	for ts := range byTS {
		stamps = append(stamps, ts)
	}
	slices.Sort(stamps)
	if len(stamps) != 3 {
		// Three pushes within one millisecond would share a stamp;
		// Prometheus-style millisecond stamps make that near impossible.
		t.Fatalf("got %d distinct push timestamps, want 3", len(stamps))
	}
	p1, p2, p3 := byTS[stamps[0]], byTS[stamps[1]], byTS[stamps[2]]
	if p1["api-1"] != 20 {
		t.Errorf("push 1: api-1 = %v, want 20", p1["api-1"])
	}
	if v, ok := p2["api-1"]; !ok || !IsStaleNaN(v) {
		t.Errorf("push 2: api-1 = %v (present %v), want the stale marker", v, ok)
	}
	if v, ok := p3["api-1"]; ok {
		t.Errorf("push 3: api-1 = %v, want absent (marker sent once)", v)
	}
	if p3["api-0"] != 10 {
		t.Errorf("push 3: api-0 = %v, want 10", p3["api-0"])
	}
}

func TestPusherRetries5xxWithGrowingDelays(t *testing.T) {
	const failures = 4
	rcv := newTestReceiver(t, func(n int, w http.ResponseWriter) {
		if n < failures {
			http.Error(w, "overloaded", http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusOK)
	})
	src := newTestSource()
	src.set(podPair("kubezonnet_pod_pair_bytes_total", "api-0", "db-0"), 42)
	cfg := testConfig(rcv.url())
	cfg.Shards = 1
	cfg.MaxBackoff = 10 * time.Second
	reg := metrics.New()
	var logs testutil.SyncBuffer
	p := newTestPusher(t, cfg, reg, slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})), src)
	pushAndWait(t, p)

	reqs := rcv.requests()
	if len(reqs) != failures+1 {
		t.Fatalf("got %d attempts, want %d", len(reqs), failures+1)
	}
	// The waits the shard chose (as logged), not the clock's gaps between
	// requests: each is the doubling base less up to 20% jitter.
	waits := retryWaits(t, logs.String())
	if len(waits) != failures {
		t.Fatalf("logged %d retry waits %v, want %d", len(waits), waits, failures)
	}
	for i, d := range waits {
		base := min(cfg.MinBackoff<<i, cfg.MaxBackoff)
		if d > base || d < base*4/5 {
			t.Errorf("wait %d = %v, want within [%v, %v]", i, d, base*4/5, base)
		}
	}
	if v := reqs[len(reqs)-1].series[0].Samples[0].Value; v != 42 {
		t.Errorf("delivered value %v, want 42", v)
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"kubezonnet_server_remote_write_retries_total", nil, failures},
		{"kubezonnet_server_remote_write_requests_total", []string{"code", "503"}, failures},
		{"kubezonnet_server_remote_write_requests_total", []string{"code", "200"}, 1},
		{"kubezonnet_server_remote_write_samples_total", []string{"result", "sent"}, 1},
		{"kubezonnet_server_remote_write_pending_samples", nil, 0},
	} {
		if v := metricValue(t, reg, c.name, c.labels...); v != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, v, c.want)
		}
	}
	if v := metricValue(t, reg, "kubezonnet_server_remote_write_last_success_timestamp_seconds"); v < float64(reqs[0].at.Unix()) {
		t.Errorf("last success %v is before the first attempt", v)
	}
}

func TestPusher429(t *testing.T) {
	for _, retryOn429 := range []bool{true, false} {
		t.Run(fmt.Sprintf("retry=%v", retryOn429), func(t *testing.T) {
			rcv := newTestReceiver(t, func(n int, w http.ResponseWriter) {
				if n == 0 {
					w.Header().Set("Retry-After", "1")
					http.Error(w, "slow down", http.StatusTooManyRequests)
					return
				}
				w.WriteHeader(http.StatusNoContent)
			})
			src := newTestSource()
			src.set(podPair("kubezonnet_pod_pair_bytes_total", "api-0", "db-0"), 1)
			cfg := testConfig(rcv.url())
			cfg.RetryOn429 = retryOn429
			reg := metrics.New()
			var logs testutil.SyncBuffer
			p := newTestPusher(t, cfg, reg, slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})), src)
			pushAndWait(t, p)
			reqs := rcv.requests()
			if !retryOn429 {
				if len(reqs) != 1 {
					t.Fatalf("got %d attempts, want 1 with retry-on-429 off", len(reqs))
				}
				if v := metricValue(t, reg, "kubezonnet_server_remote_write_samples_total", "result", "dropped"); v != 1 {
					t.Errorf("dropped = %v, want 1", v)
				}
				return
			}
			if len(reqs) != 2 {
				t.Fatalf("got %d attempts, want 2", len(reqs))
			}
			// The receiver asked for 1 s: the shard waits exactly that,
			// not its own (20 ms) backoff.
			if waits := retryWaits(t, logs.String()); len(waits) != 1 || waits[0] != time.Second {
				t.Errorf("retry waits %v, Retry-After asked for [1s]", waits)
			}
		})
	}
}

func TestPusher4xxIsFinal(t *testing.T) {
	rcv := newTestReceiver(t, func(n int, w http.ResponseWriter) {
		http.Error(w, "out of order sample "+strings.Repeat("x", 2000), http.StatusBadRequest)
	})
	src := newTestSource()
	src.set(podPair("kubezonnet_pod_pair_bytes_total", "api-0", "db-0"), 1)
	src.set(podPair("kubezonnet_pod_pair_bytes_total", "api-1", "db-0"), 1)
	var logs testutil.SyncBuffer
	reg := metrics.New()
	cfg := testConfig(rcv.url())
	cfg.Shards = 1
	p := newTestPusher(t, cfg, reg, slog.New(slog.NewJSONHandler(&logs, nil)), src)
	pushAndWait(t, p)
	if n := len(rcv.requests()); n != 1 {
		t.Fatalf("got %d attempts, want exactly 1", n)
	}
	if v := metricValue(t, reg, "kubezonnet_server_remote_write_samples_total", "result", "dropped"); v != 2 {
		t.Errorf("dropped = %v, want 2", v)
	}
	if v := metricValue(t, reg, "kubezonnet_server_remote_write_retries_total"); v != 0 {
		t.Errorf("retries = %v, want 0", v)
	}
	out := logs.String()
	if !strings.Contains(out, "out of order sample") || !strings.Contains(out, `"code":400`) {
		t.Errorf("log lacks the code and body: %s", out)
	}
	if strings.Contains(out, strings.Repeat("x", 1000)) {
		t.Errorf("log carries the whole body, want only its first bytes")
	}
}

// flakyEndpoint is a receiver whose listener can be closed and reopened on
// the same port, so "down" means connection refused, as for a crashed
// Prometheus.
type flakyEndpoint struct {
	*testReceiver
	addr string
}

func newFlakyEndpoint(t *testing.T) *flakyEndpoint {
	r := newTestReceiver(t, nil)
	return &flakyEndpoint{testReceiver: r, addr: r.srv.Listener.Addr().String()}
}

func (f *flakyEndpoint) down() { f.srv.Close() }

func (f *flakyEndpoint) up(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp", f.addr)
	if err != nil {
		t.Fatalf("reopening %s: %v", f.addr, err)
	}
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	f.srv.Listener.Close()
	f.srv.Listener = ln
	f.srv.Start()
	t.Cleanup(f.srv.Close)
}

func TestPusherOutageThenRecoveryCarriesCumulativeValue(t *testing.T) {
	ep := newFlakyEndpoint(t)
	src := newTestSource()
	pairs := [][]metrics.Label{
		podPair("kubezonnet_pod_pair_bytes_total", "api-0", "db-0"),
		podPair("kubezonnet_pod_pair_bytes_total", "api-1", "db-0"),
		podPair("kubezonnet_pod_pair_bytes_total", "api-2", "db-0"),
	}
	var mu sync.Mutex
	counting := true
	src.onCall = func(s *testSource) {
		mu.Lock()
		defer mu.Unlock()
		if !counting {
			return
		}
		for i, ls := range pairs { // traffic keeps flowing, one "flush" per push
			k := metricKey(ls)
			s.series[k] = Series{Labels: ls, Value: s.series[k].Value + float64(1000*(i+1))}
		}
	}
	cfg := testConfig(ep.url())
	cfg.Interval = 30 * time.Millisecond
	cfg.MinBackoff = 5 * time.Millisecond
	cfg.MaxBackoff = 20 * time.Millisecond // shorter than the interval
	cfg.Shards = 2
	reg := metrics.New()
	p := newTestPusher(t, cfg, reg, nil, src)
	runPusher(t, p)

	eventually(t, "two pushes before the outage", func() bool { return len(ep.requests()) >= 4 })
	ep.down()
	nBefore := len(ep.requests())
	downAt := src.callCount()
	eventually(t, "ten pushes during the outage", func() bool { return src.callCount() >= downAt+10 })
	mu.Lock()
	counting = false
	mu.Unlock()
	frozen := map[string]float64{}
	for _, ls := range pairs {
		frozen[metricKey(ls)[:0]+ls[10].Value] = src.value(ls)
	}
	frozenAt := src.callCount()
	// Three more snapshots so every shard holds post-freeze data.
	eventually(t, "pushes after the freeze", func() bool { return src.callCount() >= frozenAt+3 })
	if v := metricValue(t, reg, "kubezonnet_server_remote_write_pending_samples"); v > 2*float64(len(pairs)) {
		t.Errorf("pending samples %v during the outage, want at most two snapshots (%d)", v, 2*len(pairs))
	}
	ep.up(t)
	eventually(t, "every series after recovery", func() bool {
		seen := map[string]bool{}
		for _, r := range ep.requests()[nBefore:] {
			for _, ts := range r.series {
				seen[testutil.LabelValue(ts.Labels, "src_pod")] = true
			}
		}
		return len(seen) == len(pairs)
	})
	first := map[string]float64{}
	lastTS := map[string]int64{}
	for i, r := range ep.requests() {
		for _, ts := range r.series {
			pod := testutil.LabelValue(ts.Labels, "src_pod")
			if ts.Samples[0].Timestamp < lastTS[pod] {
				t.Errorf("%s: timestamps went backwards", pod)
			}
			lastTS[pod] = ts.Samples[0].Timestamp
			if _, ok := first[pod]; !ok && i >= nBefore {
				first[pod] = ts.Samples[0].Value
			}
		}
	}
	for pod, want := range frozen {
		if first[pod] != want {
			t.Errorf("%s: first value after recovery %v, want the full cumulative %v", pod, first[pod], want)
		}
	}
	if v := metricValue(t, reg, "kubezonnet_server_remote_write_requests_total", "code", "error"); v < 1 {
		t.Errorf("no failed attempt counted during the outage")
	}
}

// blackhole accepts connections and never answers.
func blackhole(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return "http://" + ln.Addr().String() + "/api/v1/write"
}

// closedPort returns a URL nobody listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr + "/api/v1/write"
}

func TestPusherDeadEndpointDoesNotBlockLiveOne(t *testing.T) {
	for _, tc := range []struct {
		name string
		dead func(*testing.T) string
	}{
		{"never answers", blackhole},
		{"connection refused", closedPort},
	} {
		t.Run(tc.name, func(t *testing.T) {
			live := newTestReceiver(t, nil)
			src := newTestSource()
			pair := podPair("kubezonnet_pod_pair_bytes_total", "api-0", "db-0")
			src.onCall = func(s *testSource) {
				k := metricKey(pair)
				s.series[k] = Series{Labels: pair, Value: s.series[k].Value + 1}
			}
			cfg := testConfig(tc.dead(t), live.url())
			cfg.Endpoints[0].Name = "dead"
			cfg.Endpoints[0].Timeout = time.Minute // stuck for the whole test
			cfg.Endpoints[1].Name = "live"
			cfg.Interval = 20 * time.Millisecond
			cfg.Shards = 1
			reg := metrics.New()
			p, err := NewPusher(cfg, []Source{src}, reg, nil)
			if err != nil {
				t.Fatal(err)
			}
			stop := runPusher(t, p)
			eventually(t, "twenty pushes", func() bool { return src.callCount() >= 20 })
			stop()
			pushes := src.callCount()
			// Every snapshot value 1..pushes must reach the live endpoint.
			eventually(t, "the live endpoint to receive every push", func() bool {
				vals := map[float64]bool{}
				for _, r := range live.requests() {
					for _, ts := range r.series {
						vals[ts.Samples[0].Value] = true
					}
				}
				for v := 1; v <= pushes; v++ {
					if !vals[float64(v)] {
						return false
					}
				}
				return true
			})
			if v := metricValue(t, reg, "kubezonnet_server_remote_write_pending_samples", "endpoint", "dead"); v > 2 {
				t.Errorf("dead endpoint holds %v pending samples, want at most two snapshots' worth (2)", v)
			}
			if v := metricValue(t, reg, "kubezonnet_server_remote_write_samples_total", "endpoint", "dead", "result", "sent"); v != 0 {
				t.Errorf("dead endpoint sent %v", v)
			}
			// Shutdown must not hang on the dead endpoint.
			fctx, fcancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer fcancel()
			if err := p.Flush(fctx); err == nil {
				t.Errorf("Flush reported success with a dead endpoint")
			}
			if v := metricValue(t, reg, "kubezonnet_server_remote_write_samples_total", "endpoint", "dead", "result", "failed"); v == 0 {
				t.Errorf("dead endpoint counted no failed samples")
			}
		})
	}
}

// ---- created-timestamp zeros ------------------------------------------------

// setClock makes p stamp its snapshots with the value of the returned
// variable (milliseconds since the epoch), so tests know every stamp. Call
// it before the first push.
func setClock(p *Pusher, ms int64) *atomic.Int64 {
	c := new(atomic.Int64)
	c.Store(ms)
	p.now = func() time.Time { return time.UnixMilli(c.Load()) }
	return c
}

// samplesBySeries returns the samples each src_pod received, in the order
// they arrived.
func samplesBySeries(reqs []received) map[string][]prompb.Sample {
	out := map[string][]prompb.Sample{}
	for _, r := range reqs {
		for _, ts := range r.series {
			pod := testutil.LabelValue(ts.Labels, "src_pod")
			out[pod] = append(out[pod], ts.Samples...)
		}
	}
	return out
}

func TestPusherCreatedZero(t *testing.T) {
	const ts1, ts2 = 1_700_000_000_000, 1_700_000_015_000
	for _, tc := range []struct {
		name    string
		created int64
		zero    bool
	}{
		{"created long before", ts1 - 3_600_000, true},
		{"created 1 ms before", ts1 - 1, true},
		{"created at the stamp", ts1, false},
		{"created after the stamp", ts1 + 1, false},
		{"unknown", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rcv := newTestReceiver(t, nil)
			reg := metrics.New()
			ls := podPair("kubezonnet_pod_pair_bytes_total", "api-0", "db-0")
			se := Series{Labels: ls, Value: 1500, Created: tc.created}
			src := SourceFunc(func(dst []Series) []Series { return append(dst, se) })
			p := newTestPusher(t, testConfig(rcv.url()), reg, nil, src)
			clock := setClock(p, ts1)
			pushAndWait(t, p)
			// The second push finds the series by content (a rebuilt
			// slice) and still reports a Created: a known series never
			// gets a zero.
			se = Series{Labels: slices.Clone(ls), Value: 2500, Created: tc.created}
			clock.Store(ts2)
			pushAndWait(t, p)

			want := []prompb.Sample{{Value: 1500, Timestamp: ts1}, {Value: 2500, Timestamp: ts2}}
			wantZeros := 0.0
			if tc.zero {
				want = append([]prompb.Sample{{Value: 0, Timestamp: tc.created}}, want...)
				wantZeros = 1
			}
			if got := samplesBySeries(rcv.requests())["api-0"]; !slices.EqualFunc(got, want, sameSample) {
				t.Errorf("received %v, want %v", got, want)
			}
			for _, c := range []struct {
				name   string
				labels []string
				want   float64
			}{
				{"kubezonnet_server_remote_write_zero_samples_total", nil, wantZeros},
				{"kubezonnet_server_remote_write_zero_samples_rejected_total", nil, 0},
				{"kubezonnet_server_remote_write_samples_total", []string{"result", "sent"}, 2},
			} {
				if v := metricValue(t, reg, c.name, c.labels...); v != c.want {
					t.Errorf("%s%v = %v, want %v", c.name, c.labels, v, c.want)
				}
			}
		})
	}
}

// TestPusherCreatedZeroAfterStale: a series that vanished (stale marker)
// and comes back is new to the pusher again, and so gets its zero again.
func TestPusherCreatedZeroAfterStale(t *testing.T) {
	const ts1, ts2, ts3 = 1_700_000_000_000, 1_700_000_015_000, 1_700_000_030_000
	rcv := newTestReceiver(t, nil)
	src := newTestSource()
	a := podPair("kubezonnet_pod_pair_bytes_total", "api-0", "db-0")
	b := podPair("kubezonnet_pod_pair_bytes_total", "api-1", "db-0")
	src.series[metricKey(a)] = Series{Labels: a, Value: 100, Created: ts1 - 5000}
	src.series[metricKey(b)] = Series{Labels: b, Value: 7, Created: ts1 - 9000}
	p := newTestPusher(t, testConfig(rcv.url()), nil, nil, src)
	clock := setClock(p, ts1)
	pushAndWait(t, p)
	src.remove(a)
	clock.Store(ts2)
	pushAndWait(t, p)
	src.mu.Lock()
	src.series[metricKey(a)] = Series{Labels: a, Value: 40, Created: ts2 + 2000}
	src.mu.Unlock()
	clock.Store(ts3)
	pushAndWait(t, p)

	got := samplesBySeries(rcv.requests())
	wantA := []prompb.Sample{
		{Value: 0, Timestamp: ts1 - 5000}, {Value: 100, Timestamp: ts1},
		{Value: StaleNaN, Timestamp: ts2},
		{Value: 0, Timestamp: ts2 + 2000}, {Value: 40, Timestamp: ts3},
	}
	wantB := []prompb.Sample{{Value: 0, Timestamp: ts1 - 9000}, {Value: 7, Timestamp: ts1}, {Value: 7, Timestamp: ts2}, {Value: 7, Timestamp: ts3}}
	for pod, want := range map[string][]prompb.Sample{"api-0": wantA, "api-1": wantB} {
		if !slices.EqualFunc(got[pod], want, sameSample) {
			t.Errorf("%s received %v, want %v", pod, got[pod], want)
		}
	}
}

// sameSample compares samples bit for bit, so that StaleNaN equals itself.
func sameSample(a, b prompb.Sample) bool {
	return a.Timestamp == b.Timestamp && math.Float64bits(a.Value) == math.Float64bits(b.Value)
}

// TestPusherZeroFallback: a receiver that already has a series rejects
// the request carrying its zero as out of order (Prometheus 2.x answers
// 400 for the whole request); the pusher resends the request without its
// zeros, and only drops samples when that is rejected too.
func TestPusherZeroFallback(t *testing.T) {
	const ts1, ts2 = 1_700_000_000_000, 1_700_000_015_000
	// rejectZeros answers like a Prometheus holding every series up to
	// the snapshot's stamp already.
	rejectZeros := func(series []prompb.TimeSeries, w http.ResponseWriter) {
		for _, ts := range series {
			for _, s := range ts.Samples {
				if s.Timestamp != ts1 && s.Timestamp != ts2 {
					http.Error(w, "out of order sample", http.StatusBadRequest)
					return
				}
			}
		}
		w.WriteHeader(http.StatusNoContent)
	}
	for _, tc := range []struct {
		name  string
		judge func([]prompb.TimeSeries, http.ResponseWriter)
		// attempts per push: the zeros' request, then its fallback
		attempts    int
		wantDropped float64
		// wantLog is in the log after the two pushes: once for the
		// fallback's warning, at least once for drops (throttled).
		wantLog   string
		wantMarks []int64
	}{
		{
			name: "fallback accepted", judge: rejectZeros, attempts: 2,
			wantLog: "resending it without them", wantMarks: []int64{ts1, ts2},
		},
		{
			name: "fallback rejected too",
			judge: func(_ []prompb.TimeSeries, w http.ResponseWriter) {
				http.Error(w, "out of order sample", http.StatusBadRequest)
			},
			attempts: 2, wantDropped: 5, wantLog: "samples dropped",
		},
		{
			// A final 429 is a limit, not the zeros' fault: no fallback.
			name: "429 not retried",
			judge: func(_ []prompb.TimeSeries, w http.ResponseWriter) {
				http.Error(w, "ingestion rate limit", http.StatusTooManyRequests)
			},
			attempts: 1, wantDropped: 5, wantLog: "samples dropped",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rcv := newJudgingReceiver(t, tc.judge)
			src := newTestSource()
			known := podPair("kubezonnet_pod_pair_bytes_total", "api-0", "db-0")
			src.set(known, 10)
			fresh := podPair("kubezonnet_pod_pair_bytes_total", "api-1", "db-0")
			src.series[metricKey(fresh)] = Series{Labels: fresh, Value: 20, Created: ts1 - 1000}
			cfg := testConfig(rcv.url())
			cfg.Shards = 1
			cfg.RetryOn429 = false // a 429 is final, as for Cortex and Mimir limits
			var logs testutil.SyncBuffer
			reg := metrics.New()
			p := newTestPusher(t, cfg, reg, slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn})), src)
			var wm watermarks
			p.OnDelivered(wm.record)
			clock := setClock(p, ts1)
			pushAndWait(t, p)
			// A second new series with a zero: rejected again, logged once.
			other := podPair("kubezonnet_pod_pair_bytes_total", "api-2", "db-0")
			src.series[metricKey(other)] = Series{Labels: other, Value: 30, Created: ts2 - 1000}
			clock.Store(ts2)
			pushAndWait(t, p)

			reqs := rcv.requests()
			if len(reqs) != 2*tc.attempts {
				t.Fatalf("got %d attempts, want %d per push", len(reqs), tc.attempts)
			}
			if tc.attempts == 2 {
				for i, r := range reqs {
					zeros := 0
					for _, ts := range r.series {
						zeros += len(ts.Samples) - 1
					}
					if want := 1 - i%2; zeros != want { // the request, then its fallback
						t.Errorf("attempt %d carries %d zeros, want %d", i, zeros, want)
					}
					if want := 2 + i/2; len(r.series) != want {
						t.Errorf("attempt %d carries %d series, want %d", i, len(r.series), want)
					}
				}
			}
			rejected := 0.0
			if tc.attempts == 2 {
				rejected = 2
			}
			for _, c := range []struct {
				name   string
				labels []string
				want   float64
			}{
				{"kubezonnet_server_remote_write_zero_samples_total", nil, 2},
				{"kubezonnet_server_remote_write_zero_samples_rejected_total", nil, rejected},
				{"kubezonnet_server_remote_write_samples_total", []string{"result", "sent"}, 5 - tc.wantDropped},
				{"kubezonnet_server_remote_write_samples_total", []string{"result", "dropped"}, tc.wantDropped},
				{"kubezonnet_server_remote_write_pending_samples", nil, 0},
				{"kubezonnet_server_remote_write_retries_total", nil, 0},
			} {
				if v := metricValue(t, reg, c.name, c.labels...); v != c.want {
					t.Errorf("%s%v = %v, want %v", c.name, c.labels, v, c.want)
				}
			}
			out := logs.String()
			if n := strings.Count(out, tc.wantLog); n == 0 || (tc.wantDropped == 0 && n != 1) {
				t.Errorf("log has %q %d times:\n%s", tc.wantLog, n, out)
			}
			if tc.attempts == 2 && (!strings.Contains(out, `"code":400`) || !strings.Contains(out, "out of order sample")) {
				t.Errorf("log lacks the status and body of the rejection:\n%s", out)
			}
			if got := wm.get(); !slices.Equal(got, tc.wantMarks) {
				t.Errorf("delivery watermark calls %v, want %v", got, tc.wantMarks)
			}
		})
	}
}

// ---- delivery watermark -----------------------------------------------------

// watermarks records OnDelivered calls.
type watermarks struct {
	mu    sync.Mutex
	calls []int64
}

func (w *watermarks) record(ts int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.calls = append(w.calls, ts)
}

func (w *watermarks) get() []int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.calls)
}

// TestPusherOnDeliveredSlowEndpoint: with one endpoint failing, no
// snapshot is delivered everywhere; when it recovers, the snapshot that
// superseded the one it was retrying is reported, and never the older one.
func TestPusherOnDeliveredSlowEndpoint(t *testing.T) {
	const ts1, ts2, ts3 = 1_700_000_000_000, 1_700_000_015_000, 1_700_000_030_000
	fine := newTestReceiver(t, nil)
	var down atomic.Bool
	down.Store(true)
	slow := newTestReceiver(t, func(_ int, w http.ResponseWriter) {
		if down.Load() {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	src := newTestSource()
	for i := range 6 {
		src.set(podPair("kubezonnet_pod_pair_bytes_total", fmt.Sprintf("api-%d", i), "db-0"), float64(i))
	}
	cfg := testConfig(fine.url(), slow.url())
	cfg.Endpoints[0].Name, cfg.Endpoints[1].Name = "fine", "slow"
	cfg.Shards = 2
	reg := metrics.New()
	p := newTestPusher(t, cfg, reg, nil, src)
	var wm watermarks
	p.OnDelivered(wm.record)
	clock := setClock(p, ts1)

	// The conditions polled here are the receivers' (metricValue would
	// read the registry while shards register their status counters).
	p.Push()
	eventually(t, "the slow endpoint to retry", func() bool { return len(slow.requests()) >= 3 })
	clock.Store(ts2)
	p.Push()
	eventually(t, "the fine endpoint to take both snapshots", func() bool {
		n := 0
		for _, s := range samplesBySeries(fine.requests()) {
			n += len(s)
		}
		return n == 12
	})
	eventually(t, "the slow endpoint to retry the newer snapshot", func() bool {
		ts := samplesBySeries(slow.requests())
		for _, s := range ts {
			if s[len(s)-1].Timestamp == ts2 {
				return true
			}
		}
		return false
	})
	if got := wm.get(); len(got) != 0 {
		t.Fatalf("watermark advanced to %v while an endpoint had nothing delivered", got)
	}
	down.Store(false)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	// Wait returning means the callback ran: no polling here.
	if got, want := wm.get(), []int64{ts2}; !slices.Equal(got, want) {
		t.Fatalf("watermark calls %v after recovery, want %v (the superseded %d never)", got, want, int64(ts1))
	}
	if v := metricValue(t, reg, "kubezonnet_server_remote_write_samples_total", "endpoint", "slow", "result", "failed"); v != 6 {
		t.Errorf("slow endpoint: %v samples failed, want the superseded snapshot's 6", v)
	}
	clock.Store(ts3)
	pushAndWait(t, p)
	if got, want := wm.get(), []int64{ts2, ts3}; !slices.Equal(got, want) {
		t.Errorf("watermark calls %v, want %v", got, want)
	}
}

// TestPusherOnDeliveredDropped: a snapshot with a dropped request does not
// advance the watermark; the next one delivered everywhere does.
func TestPusherOnDeliveredDropped(t *testing.T) {
	const ts1, ts2 = 1_700_000_000_000, 1_700_000_015_000
	fine := newTestReceiver(t, nil)
	picky := newTestReceiver(t, func(n int, w http.ResponseWriter) {
		if n == 0 {
			http.Error(w, "invalid label", http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	src := newTestSource()
	src.set(podPair("kubezonnet_pod_pair_bytes_total", "api-0", "db-0"), 1)
	cfg := testConfig(fine.url(), picky.url())
	cfg.Shards = 1
	reg := metrics.New()
	p := newTestPusher(t, cfg, reg, nil, src)
	var wm watermarks
	p.OnDelivered(wm.record)
	// Each endpoint's gauge says which snapshot it has in full.
	delivered := func() (fineAt, pickyAt float64) {
		const g = "kubezonnet_server_remote_write_delivered_snapshot_timestamp_seconds"
		return metricValue(t, reg, g, "endpoint", strings.TrimPrefix(fine.url(), "http://")),
			metricValue(t, reg, g, "endpoint", strings.TrimPrefix(picky.url(), "http://"))
	}
	clock := setClock(p, ts1)
	pushAndWait(t, p)
	if got := wm.get(); len(got) != 0 {
		t.Fatalf("watermark advanced to %v for a snapshot an endpoint dropped", got)
	}
	if f, k := delivered(); f != ts1/1000 || k != 0 {
		t.Errorf("delivered snapshot gauges %v (fine), %v (dropped it), want %v and 0", f, k, ts1/1000)
	}
	clock.Store(ts2)
	pushAndWait(t, p)
	if got, want := wm.get(), []int64{ts2}; !slices.Equal(got, want) {
		t.Errorf("watermark calls %v, want %v", got, want)
	}
	if f, k := delivered(); f != ts2/1000 || k != ts2/1000 {
		t.Errorf("delivered snapshot gauges %v, %v, want %v for both", f, k, ts2/1000)
	}
}

// TestPusherOnDeliveredMonotonic: snapshots completing out of order (an
// older one finishing after a newer one, as shards race) never move the
// watermark back, and calls never overlap.
func TestPusherOnDeliveredMonotonic(t *testing.T) {
	p, err := NewPusher(testConfig(), nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	var busy atomic.Bool
	var wm watermarks
	p.OnDelivered(func(ts int64) {
		if busy.Swap(true) {
			t.Error("OnDelivered calls overlap")
		}
		wm.record(ts)
		busy.Store(false)
	})
	var wg sync.WaitGroup
	for _, ts := range []int64{5, 3, 9, 9, 1, 12, 7} {
		d := &delivery{ts: ts}
		d.remaining.Store(2)
		wg.Add(2)
		for range 2 {
			go func() {
				defer wg.Done()
				p.finished(d, true)
			}()
		}
		wg.Wait()
	}
	if got, want := wm.get(), []int64{5, 9, 12}; !slices.Equal(got, want) {
		t.Errorf("watermark calls %v, want %v", got, want)
	}
}

// ---- benchmarks -------------------------------------------------------------

// staticSource returns the same series every snapshot, as the server's
// aggregate does between two flushes of its agents.
type staticSource []Series

func (s staticSource) AppendSeries(dst []Series) []Series { return append(dst, s...) }

func benchSeries(n int) staticSource {
	out := make(staticSource, n)
	for i := range out {
		ls := podPair("kubezonnet_pod_pair_bytes_total", fmt.Sprintf("api-7d9f8c6b5-%05d", i), fmt.Sprintf("db-%d", i%3))
		out[i] = Series{Labels: ls, Value: float64(i) * 1500}
	}
	return out
}

// BenchmarkSnapshot100k measures one push's CPU work for 100,000 pod-pair
// series: reading the source, dedup and stale detection, protobuf encoding
// with the external label merged in, and snappy compression.
func BenchmarkSnapshot100k(b *testing.B) {
	const n = 100_000
	p, reqs := benchSnapshots(b, benchSeries(n))
	var bytes int
	for _, r := range reqs {
		for _, q := range r {
			bytes += len(q.body)
		}
	}
	b.ReportMetric(float64(bytes)/n, "compressed-B/series")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/series")
	// What the pusher keeps between pushes to go this fast: the encoded
	// labels of every series (seriesTable).
	b.ReportMetric(float64(cap(p.table.arena))/n, "cache-B/series")
}

// BenchmarkPushThroughput measures samples per second delivered to a local
// receiver (which reads and discards the body, on the same cores): snapshot,
// encode, compress, HTTP, in full.
func BenchmarkPushThroughput(b *testing.B) {
	const n = 20_000
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	cfg := testConfig(srv.URL)
	reg := metrics.New()
	p, err := NewPusher(cfg, []Source{benchSeries(n)}, reg, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = p.Flush(context.Background()) }()
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		p.Push()
		if err := p.Wait(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	sent := metricValue(b, reg, "kubezonnet_server_remote_write_samples_total", "result", "sent")
	if sent != float64(n*b.N) {
		b.Fatalf("sent %v samples, want %d", sent, n*b.N)
	}
	b.ReportMetric(sent/b.Elapsed().Seconds(), "samples/s")
}

// TestLabelMatchesGeneralEncoding checks the fast label encoder against
// the general protowire one, across the one-byte-length boundary.
func TestLabelMatchesGeneralEncoding(t *testing.T) {
	for _, tc := range []struct{ name, value string }{
		{"a", ""},
		{"__name__", "kubezonnet_pod_pair_bytes_total"},
		{"src_pod", strings.Repeat("p", 123-len("src_pod"))}, // size 127: fast path
		{"src_pod", strings.Repeat("p", 124-len("src_pod"))}, // size 128: two-byte length
		{"src_pod", strings.Repeat("p", 300)},
	} {
		var a, b SeriesBuilder
		a.labelGeneral(tc.name, tc.value)
		b.Label(tc.name, tc.value)
		if !bytes.Equal(a.AppendTo(nil), b.AppendTo(nil)) {
			t.Errorf("label %s with %d-byte value: encodings differ", tc.name, len(tc.value))
		}
	}
}

// mapSource returns its series from a Go map, as the server's aggregator
// does: at every snapshot in another iteration order (a rotation of the
// map's slot order, started at a random slot).
type mapSource map[int]Series

func (s mapSource) AppendSeries(dst []Series) []Series {
	for _, se := range s {
		dst = append(dst, se)
	}
	return dst
}

// BenchmarkSnapshotMapOrder100k is BenchmarkSnapshot100k with the series
// in Go map order, which changes from push to push, as the aggregator
// returns them: the pusher must still recognise series without a map
// lookup for most of them (seriesEntry.next).
func BenchmarkSnapshotMapOrder100k(b *testing.B) {
	const n = 100_000
	src := mapSource{}
	for i, s := range benchSeries(n) {
		src[i] = s
	}
	benchSnapshots(b, src)
}

// flipSource returns two disjoint sets of series in turn, so that every
// series of a snapshot is new to the pusher and every one of the snapshot
// before vanishes: the pusher's costliest case, pod churn.
type flipSource struct {
	sets [2]staticSource
	n    int
}

func (s *flipSource) AppendSeries(dst []Series) []Series {
	s.n++
	return append(dst, s.sets[s.n%2]...)
}

// BenchmarkSnapshotNewSeries10k measures snapshots of 10,000 series that
// are all new (and 10,000 stale markers), without and with a created
// timestamp: the cost of the zero samples and of the fallback bodies they
// need, which known series never pay (BenchmarkSnapshot100k).
func BenchmarkSnapshotNewSeries10k(b *testing.B) {
	const n = 10_000
	for _, created := range []int64{0, 1} {
		b.Run(fmt.Sprintf("created=%v", created != 0), func(b *testing.B) {
			all := benchSeries(2 * n)
			for i := range all {
				all[i].Created = created
			}
			benchSnapshots(b, &flipSource{sets: [2]staticSource{all[:n], all[n:]}})
		})
	}
}

// benchSnapshots times b.N snapshots of a pusher over src (with an external
// label merged in) after a first one that warms buffers and the series
// table; it returns the pusher and the first snapshot's requests.
func benchSnapshots(b *testing.B, src Source) (*Pusher, [][]request) {
	cfg := testConfig()
	cfg.ExternalLabels = []metrics.Label{{Name: "cluster", Value: "prod"}}
	p, err := NewPusher(cfg, []Source{src}, nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	ts := time.Now().UnixMilli()
	reqs := p.snapshot(ts)
	b.ReportAllocs()
	cpu0 := testutil.CPUTime()
	b.ResetTimer()
	for i := range b.N {
		p.snapshot(ts + int64(i) + 1)
	}
	b.StopTimer()
	// CPU time of the process (snapshot plus the GC work it causes): on a
	// shared machine wall time also counts other tenants' load.
	b.ReportMetric(float64((testutil.CPUTime()-cpu0).Nanoseconds())/float64(b.N), "cpu-ns/op")
	return p, reqs
}

// With two endpoints, one still sending and one done, Run takes a
// snapshot at every interval: the endpoint that keeps up is not held back
// by the slow one, which gets the newest snapshot when it is done.
func TestPusherRunSlowEndpointDoesNotHoldBackOther(t *testing.T) {
	slow := newHangingReceiver(t)
	fast := newHangingReceiver(t)
	fast.release()
	cfg := testConfig(slow.url(), fast.url())
	cfg.Shards = 1
	cfg.Interval = 10 * time.Millisecond
	var v, snapshots atomic.Int64
	src := SourceFunc(func(dst []Series) []Series {
		snapshots.Add(1)
		return append(dst, Series{Labels: []metrics.Label{{Name: "__name__", Value: "x_total"}}, Value: float64(v.Add(1))})
	})
	reg := metrics.New()
	p := newTestPusher(t, cfg, reg, nil, src)
	runPusher(t, p)

	eventually(t, "the slow endpoint's first request", func() bool { return slow.requests.Load() > 0 })
	eventually(t, "snapshots at every interval for the endpoint that keeps up", func() bool {
		return fast.requests.Load() >= 5 && snapshots.Load() >= 5
	})
	// Still within the slow endpoint's first attempt (its timeout is 5 s):
	// the snapshots did not wait for it to fail.
	if n := metricValue(t, reg, "kubezonnet_server_remote_write_retries_total", "endpoint", strings.TrimPrefix(slow.url(), "http://")); n != 0 {
		t.Fatalf("the slow endpoint was retried %v times before the other got its snapshots", n)
	}
	slow.release()
	eventually(t, "the slow endpoint with a newer value than its first", func() bool { return slow.got.Load() > 1 })
}

// hangingReceiver holds the first request it gets until release, and
// keeps the last value it received; while failing it answers 503.
type hangingReceiver struct {
	*testReceiver
	got, requests atomic.Int64
	failing       atomic.Bool
	hold          chan struct{}
	once          sync.Once
}

func newHangingReceiver(t *testing.T) *hangingReceiver {
	r := &hangingReceiver{hold: make(chan struct{})}
	r.testReceiver = newJudgingReceiver(t, func(series []prompb.TimeSeries, w http.ResponseWriter) {
		if r.failing.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		if r.requests.Add(1) == 1 {
			<-r.hold
		}
		for _, ts := range series {
			r.got.Store(int64(ts.Samples[len(ts.Samples)-1].Value))
		}
		w.WriteHeader(http.StatusNoContent)
	})
	t.Cleanup(r.release)
	return r
}

// release lets the first request go; it may be called more than once.
func (r *hangingReceiver) release() { r.once.Do(func() { close(r.hold) }) }

// A push that is still being sent when the next one is taken is an
// overrun: counted once per snapshot and endpoint, and the newer snapshot
// is what the endpoint ends up with.
func TestPusherOverrun(t *testing.T) {
	rcv := newHangingReceiver(t)
	got, requests := &rcv.got, &rcv.requests
	cfg := testConfig(rcv.url())
	cfg.Shards = 1
	reg := metrics.New()
	var v atomic.Int64
	src := SourceFunc(func(dst []Series) []Series {
		return append(dst, Series{Labels: []metrics.Label{{Name: "__name__", Value: "x_total"}}, Value: float64(v.Load())})
	})
	p := newTestPusher(t, cfg, reg, nil, src)
	v.Store(1)
	p.Push()
	eventually(t, "the first snapshot to reach the endpoint", func() bool { return requests.Load() > 0 })
	if n := metricValue(t, reg, "kubezonnet_server_remote_write_push_overruns_total"); n != 0 {
		t.Fatalf("overruns before a second push: %v", n)
	}
	v.Store(2)
	p.Push()
	v.Store(3)
	p.Push()
	if n := metricValue(t, reg, "kubezonnet_server_remote_write_push_overruns_total"); n != 2 {
		t.Errorf("overruns after two pushes during a hanging one: %v, want 2", n)
	}
	rcv.release()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if g := got.Load(); g != 3 {
		t.Errorf("endpoint holds %d, want the newest value 3", g)
	}
}

// Run takes no snapshot while every endpoint is still sending the
// previous one without errors: each interval that passes counts as an
// overrun, and the snapshot follows the moment the endpoint has sent
// everything, with the values of that moment. An endpoint that is
// retrying gets a snapshot at every interval instead (the newer one
// replacing the unsent part, TestPusherOutageThenRecoveryCarriesCumulativeValue).
func TestPusherRunDefersWhileSending(t *testing.T) {
	rcv := newHangingReceiver(t)
	got, requests, failing := &rcv.got, &rcv.requests, &rcv.failing
	cfg := testConfig(rcv.url())
	cfg.Shards = 1
	cfg.Interval = 10 * time.Millisecond
	cfg.MinBackoff = 5 * time.Millisecond
	cfg.MaxBackoff = 5 * time.Millisecond
	reg := metrics.New()
	var v, snapshots atomic.Int64
	src := SourceFunc(func(dst []Series) []Series {
		snapshots.Add(1)
		return append(dst, Series{Labels: []metrics.Label{{Name: "__name__", Value: "x_total"}}, Value: float64(v.Load())})
	})
	v.Store(1)
	p := newTestPusher(t, cfg, reg, nil, src)
	runPusher(t, p)

	eventually(t, "the first snapshot to reach the endpoint", func() bool { return requests.Load() > 0 })
	eventually(t, "intervals passing while it hangs", func() bool {
		return metricValue(t, reg, "kubezonnet_server_remote_write_push_overruns_total") >= 5
	})
	if n := snapshots.Load(); n != 1 {
		t.Fatalf("%d snapshots taken while the first was being sent, want 1", n)
	}
	v.Store(7)
	rcv.release()
	eventually(t, "the deferred snapshot with the value at the release", func() bool { return got.Load() == 7 })

	// A failing endpoint is busy too, but gets snapshots at every interval.
	failing.Store(true)
	v.Store(8)
	eventually(t, "the endpoint failing", func() bool {
		return metricValue(t, reg, "kubezonnet_server_remote_write_retries_total") > 0
	})
	at := snapshots.Load()
	eventually(t, "snapshots taken while it fails", func() bool { return snapshots.Load() >= at+5 })
	failing.Store(false)
	v.Store(9)
	eventually(t, "the newest value after recovery", func() bool { return got.Load() == 9 })
}

// A zero that the receiver may refuse (MayExist: a restarted source that
// cannot tell whether the series was delivered) travels in a request of
// its own: when the receiver refuses it, the zero of a series that is new
// for certain still arrives, and the refused one's value arrives without
// its zero.
func TestPusherMayExistZerosApart(t *testing.T) {
	var mu sync.Mutex
	samples := map[string][]prompb.Sample{} // accepted, by series
	rcv := newJudgingReceiver(t, func(series []prompb.TimeSeries, w http.ResponseWriter) {
		// Like Prometheus for a series it holds: an older sample is out
		// of order, and the whole request is refused.
		for _, ts := range series {
			if testutil.LabelValue(ts.Labels, "s") == "held" && len(ts.Samples) > 1 {
				http.Error(w, "out of order sample", http.StatusBadRequest)
				return
			}
		}
		mu.Lock()
		defer mu.Unlock()
		for _, ts := range series {
			k := testutil.LabelValue(ts.Labels, "s")
			samples[k] = append(samples[k], ts.Samples...)
		}
		w.WriteHeader(http.StatusNoContent)
	})
	cfg := testConfig(rcv.url())
	cfg.Shards = 1 // both series in one shard: they would share a request
	reg := metrics.New()
	created := time.Now().Add(-time.Minute).UnixMilli()
	src := SourceFunc(func(dst []Series) []Series {
		return append(dst,
			Series{Labels: []metrics.Label{{Name: "__name__", Value: "x_total"}, {Name: "s", Value: "held"}}, Value: 5, Created: created, MayExist: true},
			Series{Labels: []metrics.Label{{Name: "__name__", Value: "x_total"}, {Name: "s", Value: "new"}}, Value: 7, Created: created},
			// Uncertain too, but not held: its zero must not go down
			// with the held one's.
			Series{Labels: []metrics.Label{{Name: "__name__", Value: "x_total"}, {Name: "s", Value: "unsure"}}, Value: 9, Created: created, MayExist: true})
	})
	p := newTestPusher(t, cfg, reg, nil, src)
	pushAndWait(t, p)
	mu.Lock()
	defer mu.Unlock()
	if s := samples["new"]; len(s) != 2 || s[0].Value != 0 || s[0].Timestamp != created || s[1].Value != 7 {
		t.Errorf("the new series arrived as %v, want its zero at %d, then 7", s, created)
	}
	if s := samples["unsure"]; len(s) != 2 || s[0].Value != 0 || s[1].Value != 9 {
		t.Errorf("the uncertain series the receiver does not hold arrived as %v, want its zero, then 9", s)
	}
	if s := samples["held"]; len(s) != 1 || s[0].Value != 5 {
		t.Errorf("the held series arrived as %v, want 5 alone (its zero refused)", s)
	}
	if n := metricValue(t, reg, "kubezonnet_server_remote_write_zero_samples_rejected_total"); n != 1 {
		t.Errorf("zeros rejected: %v, want 1", n)
	}
}
