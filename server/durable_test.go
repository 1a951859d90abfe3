package server

import (
	"context"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gogo/protobuf/proto"
	"github.com/golang/snappy"
	"github.com/prometheus/prometheus/prompb"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/logging"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
)

// durableBatches are the batches the durability tests send: node-a and
// node-b, new pairs in later batches so that series are declared across
// checkpoints.
func durableBatches() []struct {
	node  string
	seq   uint64
	flows []flow.Record
} {
	type b = struct {
		node  string
		seq   uint64
		flows []flow.Record
	}
	return []b{
		{"node-a", 1, []flow.Record{rec("10.0.1.1", "10.0.2.1", 5432, 1500, 3)}},
		{"node-b", 1, []flow.Record{rec("10.0.2.1", "10.0.1.1", 5432, 700, 2)}},
		{"node-a", 2, []flow.Record{rec("10.0.1.1", "10.0.2.1", 5432, 100, 1), rec("10.0.1.2", "10.0.2.1", 5432, 40, 1)}},
		{"node-a", 3, []flow.Record{rec("10.0.1.9", "10.0.2.1", 6379, 9000, 6), rec("10.0.1.1", "192.168.9.9", 443, 64, 1)}},
		{"node-b", 2, []flow.Record{rec("10.0.2.1", "10.0.1.2", 5432, 33, 1)}},
	}
}

func durableConfig(dir string) Config {
	cfg := testConfig()
	cfg.StateDir = dir
	return cfg
}

// send posts batches[from:to] and requires each to be acknowledged.
func sendBatches(t *testing.T, env *testEnv, from, to int) {
	t.Helper()
	for _, b := range durableBatches()[from:to] {
		if code, msg := env.do(t, req{token: "-", body: encode(batch(b.node, b.seq, b.flows...))}); code != http.StatusNoContent {
			t.Fatalf("batch %s/%d: %d %s", b.node, b.seq, code, msg)
		}
	}
}

// reference is what a server that never restarted holds after batches[:n]:
// computed by a non-durable server fed the same batches.
func reference(t *testing.T, n int) []string {
	t.Helper()
	env := newTestEnv(t, testConfig(), noAuth{})
	sendBatches(t, env, 0, n)
	return env.series()
}

// crash abandons a server as a SIGKILL would: nothing is checkpointed or
// flushed; what its log made durable is on disk.
func crash(*testEnv) {}

func TestDurableRestart(t *testing.T) {
	all := len(durableBatches())
	for _, tc := range []struct {
		name string
		// checkpointAfter: batches sent before a checkpoint (-1: none).
		checkpointAfter int
		// twice: a second checkpoint after everything (log truncated).
		twice bool
	}{
		{"log only", -1, false},
		{"checkpoint then log", 2, false},
		{"checkpoint after everything", all, false},
		{"two checkpoints", 3, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			env := newTestEnv(t, durableConfig(dir), noAuth{})
			if tc.checkpointAfter >= 0 {
				sendBatches(t, env, 0, tc.checkpointAfter)
				if err := env.srv.state.checkpoint(context.Background()); err != nil {
					t.Fatal(err)
				}
				sendBatches(t, env, tc.checkpointAfter, all)
			} else {
				sendBatches(t, env, 0, all)
			}
			if tc.twice {
				if err := env.srv.state.checkpoint(context.Background()); err != nil {
					t.Fatal(err)
				}
			}
			want := reference(t, all)
			if got := env.series(); !slices.Equal(got, want) {
				t.Fatalf("before the crash:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
			}
			crash(env)

			env2 := newTestEnv(t, durableConfig(dir), noAuth{})
			if got := env2.series(); !slices.Equal(got, want) {
				t.Fatalf("after the restart:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
			}
			// An agent that did not get the acknowledgement of its last
			// batch sends it again: applied already, so not again.
			sendBatches(t, env2, all-1, all)
			if got := env2.series(); !slices.Equal(got, want) {
				t.Errorf("a retry after the restart was applied again:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
			}
			if v := env2.metric("kubezonnet_server_duplicate_batches_total", ""); v != 1 {
				t.Errorf("duplicates after the restart = %v, want 1", v)
			}
			// A later batch is applied on top of the restored counters.
			b := batch("node-a", 4, rec("10.0.1.1", "10.0.2.1", 5432, 1, 1))
			if code, msg := env2.do(t, req{token: "-", body: encode(b)}); code != http.StatusNoContent {
				t.Fatalf("%d %s", code, msg)
			}
			got := env2.series()
			if !slices.Contains(got, `kubezonnet_pod_pair_bytes_total{`+webToDB+`} 1601`) {
				t.Errorf("counters do not continue after the restart:\n%s", strings.Join(got, "\n"))
			}
		})
	}
}

// A crash tears the record being written: the restart cuts the log there,
// keeps every whole record, counts the repair, and the torn batch (never
// acknowledged) is applied when the agent sends it again.
func TestDurableTornTail(t *testing.T) {
	all := len(durableBatches())
	dir := t.TempDir()
	env := newTestEnv(t, durableConfig(dir), noAuth{})
	sendBatches(t, env, 0, all)
	crash(env)
	seg := newestSegment(t, filepath.Join(dir, "wal"))
	fi, err := os.Stat(seg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(seg, fi.Size()-3); err != nil {
		t.Fatal(err)
	}

	env2 := newTestEnv(t, durableConfig(dir), noAuth{})
	if want, got := reference(t, all-1), env2.series(); !slices.Equal(got, want) {
		t.Fatalf("after a torn tail:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
	}
	if v := env2.metric("kubezonnet_server_state_repairs_total", ""); v != 1 {
		t.Errorf("repairs = %v, want 1", v)
	}
	sendBatches(t, env2, all-1, all)
	if want, got := reference(t, all), env2.series(); !slices.Equal(got, want) {
		t.Fatalf("after the retry:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
	}
	// The repaired log takes new records and replays them.
	crash(env2)
	env3 := newTestEnv(t, durableConfig(dir), noAuth{})
	if want, got := reference(t, all), env3.series(); !slices.Equal(got, want) {
		t.Fatalf("after a second restart:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
	}
}

// newestSegment returns the path of the highest-numbered non-empty
// segment of a wlog directory.
func newestSegment(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i := len(ents) - 1; i >= 0; i-- {
		if fi, err := ents[i].Info(); err == nil && fi.Size() > 0 {
			return filepath.Join(dir, ents[i].Name())
		}
	}
	t.Fatal("no non-empty segment")
	return ""
}

// A newest checkpoint that does not read back whole is skipped for the
// one before it and the longer log kept with it.
func TestDurableCorruptCheckpoint(t *testing.T) {
	all := len(durableBatches())
	dir := t.TempDir()
	env := newTestEnv(t, durableConfig(dir), noAuth{})
	sendBatches(t, env, 0, 2)
	if err := env.srv.state.checkpoint(context.Background()); err != nil {
		t.Fatal(err)
	}
	sendBatches(t, env, 2, all)
	if err := env.srv.state.checkpoint(context.Background()); err != nil {
		t.Fatal(err)
	}
	crash(env)
	cps, _ := filepath.Glob(filepath.Join(dir, "checkpoint.*"))
	slices.Sort(cps)
	if len(cps) != 2 {
		t.Fatalf("checkpoints %v, want 2", cps)
	}
	b, err := os.ReadFile(cps[1])
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x40
	if err := os.WriteFile(cps[1], b, 0o600); err != nil {
		t.Fatal(err)
	}
	env2 := newTestEnv(t, durableConfig(dir), noAuth{})
	if want, got := reference(t, all), env2.series(); !slices.Equal(got, want) {
		t.Fatalf("after skipping a corrupt checkpoint:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
	}
	if v := env2.metric("kubezonnet_server_state_repairs_total", ""); v != 1 {
		t.Errorf("repairs = %v, want 1", v)
	}
}

// Without --state-dir, a crash loses everything: the documented behaviour.
func TestNotDurableLosesOnCrash(t *testing.T) {
	env := newTestEnv(t, testConfig(), noAuth{})
	sendBatches(t, env, 0, len(durableBatches()))
	crash(env)
	if got := newTestEnv(t, testConfig(), noAuth{}).series(); len(got) != 0 {
		t.Errorf("a server without a state directory starts with series: %v", got)
	}
}

// receiver is a remote-write endpoint that records the last value of
// every series it accepted, and can be switched off (503).
type receiver struct {
	mu   sync.Mutex
	down bool
	last map[string]float64
}

func (r *receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	down := r.down
	r.mu.Unlock()
	if down {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	body, _ := io.ReadAll(req.Body)
	raw, err := snappy.Decode(nil, body)
	var wr prompb.WriteRequest
	if err == nil {
		err = proto.Unmarshal(raw, &wr)
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ts := range wr.Timeseries {
		var b strings.Builder
		for _, l := range ts.Labels {
			b.WriteString(l.Name + "=" + l.Value + ",")
		}
		for _, s := range ts.Samples {
			if !math.IsNaN(s.Value) {
				r.last[b.String()] = s.Value
			}
		}
	}
}

// sum returns the sum of the last values of the series named name.
func (r *receiver) sum(name string) float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	v := 0.0
	for k, x := range r.last {
		if strings.HasPrefix(k, "__name__="+name+",") {
			v += x
		}
	}
	return v
}

func newPusher(t *testing.T, env *testEnv, url string) *remotewrite.Pusher {
	t.Helper()
	cfg := remotewrite.DefaultPusherConfig()
	cfg.Endpoints = []remotewrite.EndpointConfig{{Name: "test", URL: url, Timeout: time.Second}}
	cfg.MinBackoff, cfg.MaxBackoff = 10*time.Millisecond, 100*time.Millisecond
	p, err := remotewrite.NewPusher(cfg, env.srv.Sources(), env.reg, logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	p.OnDelivered(env.srv.agg.Delivered)
	return p
}

// SIGTERM while the endpoint is down: the shutdown refuses new batches,
// gives up the final push at its deadline, checkpoints and returns within
// the grace period; the acknowledged batches are in the state directory
// and reach the endpoint after the restart.
func TestShutdownEndpointDown(t *testing.T) {
	rcv := &receiver{last: map[string]float64{}, down: true}
	hs := httptest.NewServer(rcv)
	t.Cleanup(hs.Close)
	dir := t.TempDir()
	env := newTestEnv(t, durableConfig(dir), noAuth{})
	sendBatches(t, env, 0, len(durableBatches()))
	var want float64
	for _, b := range durableBatches() {
		for _, f := range b.flows {
			want += float64(f.Bytes)
		}
	}
	p := newPusher(t, env, hs.URL)

	grace := 2 * time.Second
	start := time.Now()
	shutdown(shutdownSteps{log: logging.Discard(), grace: grace, srv: env.srv,
		http: &http.Server{}, pusher: p, stop: func() {}})
	took := time.Since(start)
	// The steps run against deadlines inside the grace period; the
	// margin covers scheduling on a busy machine, not a step's work.
	if took > grace+time.Second {
		t.Errorf("shutdown took %s with a grace period of %s", took, grace)
	}
	if v := env.metric("kubezonnet_server_state_checkpoints_total", ""); v != 1 {
		t.Errorf("checkpoints = %v, want 1", v)
	}
	// New batches are refused while shutting down, with a 503 the agent
	// retries.
	if code, _ := env.do(t, req{token: "-", body: encode(batch("node-a", 9, rec("10.0.1.1", "10.0.2.1", 5432, 1, 1)))}); code != http.StatusServiceUnavailable {
		t.Errorf("batch during shutdown: %d, want 503", code)
	}
	if err := env.srv.state.close(); err != nil {
		t.Fatal(err)
	}
	if got := rcv.sum("kubezonnet_zone_pair_bytes_total"); got != 0 {
		t.Fatalf("the endpoint was down, yet it holds %v bytes", got)
	}

	rcv.mu.Lock()
	rcv.down = false
	rcv.mu.Unlock()
	env2 := newTestEnv(t, durableConfig(dir), noAuth{})
	p2 := newPusher(t, env2, hs.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p2.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if got := rcv.sum("kubezonnet_zone_pair_bytes_total"); got != want {
		t.Errorf("after the restart the endpoint holds %v bytes, want %v", got, want)
	}
}
