package remotewrite

// Tests against real remote-write receivers started from their Debian
// packages: Prometheus 2.42 and VictoriaMetrics 1.79. CI installs both and
// runs as root, so a missing binary fails the test there; elsewhere it
// skips.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
)

// requireBinary returns path, failing as root (CI) and skipping otherwise
// when it is missing. The skip message carries SKIP-PRIVILEGED, the marker
// hack/test.sh fails a root run on, like every skip that CI must not see.
func requireBinary(t *testing.T, path string) string {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		if os.Geteuid() == 0 {
			t.Fatalf("%s missing (%v): CI installs it, install the Debian package", path, err)
		}
		t.Skipf("SKIP-PRIVILEGED: %s missing (%v); CI runs as root with it installed and fails on this skip", path, err)
	}
	return path
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// startProcess runs a receiver until the test ends and waits until ready
// answers 200. Its output is shown if the test fails.
func startProcess(t *testing.T, ready string, name string, args ...string) {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("%s output:\n%s", name, out.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(ready)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case <-exited:
			t.Fatalf("%s exited before it was ready:\n%s", name, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready at %s: %v", name, ready, err)
		}
		time.Sleep(50 * time.Millisecond) // the poll interval
	}
}

// getQuery GETs a Prometheus API URL for query and decodes the answer into
// v, failing the test on any error.
func getQuery(t *testing.T, u, query string, v any) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("query %s: %s: %s", query, resp.Status, body)
	}
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("query %s: %v: %s", query, err, body)
	}
}

// instantQuery runs a PromQL instant query and returns value by src_pod.
func instantQuery(t *testing.T, base, query string) map[string]float64 {
	t.Helper()
	var r struct {
		Status string
		Data   struct {
			ResultType string
			Result     []struct {
				Metric map[string]string
				Value  [2]any
			}
		}
	}
	getQuery(t, base+"/api/v1/query?query="+url.QueryEscape(query), query, &r)
	out := map[string]float64{}
	for _, s := range r.Data.Result {
		str, _ := s.Value[1].(string)
		v, err := strconv.ParseFloat(str, 64)
		if err != nil {
			t.Fatalf("query %s: value %v: %v", query, s.Value[1], err)
		}
		if s.Metric["cluster"] != "test" {
			t.Errorf("series %v lacks the external label cluster=test", s.Metric)
		}
		out[s.Metric["src_pod"]] = v
	}
	return out
}

// receiverFixture pushes three pod pairs with values that need every bit of
// a float64 mantissa, so a lossy path would show.
func receiverFixture(t *testing.T, writeURL string) (*Pusher, *testSource, map[string][]metrics.Label) {
	t.Helper()
	src := newTestSource()
	pairs := map[string][]metrics.Label{}
	for i, v := range []float64{1 << 52, 123456789012345, 3} {
		pod := fmt.Sprintf("api-%d", i)
		pairs[pod] = podPair("kubezonnet_pod_pair_bytes_total", pod, "db-0")
		src.set(pairs[pod], v+float64(i))
	}
	cfg := testConfig(writeURL)
	cfg.ExternalLabels = []metrics.Label{{Name: "cluster", Value: "test"}}
	return newTestPusher(t, cfg, metrics.New(), nil, src), src, pairs
}

func checkValues(t *testing.T, got map[string]float64, src *testSource, pairs map[string][]metrics.Label) {
	t.Helper()
	if len(got) != len(pairs) {
		t.Errorf("query returned %d series (%v), want %d", len(got), got, len(pairs))
	}
	for pod, ls := range pairs {
		if want := src.value(ls); got[pod] != want {
			t.Errorf("%s: queried %v, pushed %v", pod, got[pod], want)
		}
	}
}

// startPrometheus runs a Prometheus that scrapes nothing and accepts
// remote write, until the test ends, and returns its base URL.
func startPrometheus(t *testing.T) string {
	t.Helper()
	bin := requireBinary(t, "/usr/bin/prometheus")
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgFile, []byte("global:\n  scrape_interval: 15s\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	base := "http://" + addr
	startProcess(t, base+"/-/ready", bin,
		"--config.file="+cfgFile,
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr,
		"--web.enable-remote-write-receiver",
		"--log.level=warn")
	return base
}

func TestRealPrometheus(t *testing.T) {
	base := startPrometheus(t)
	p, src, pairs := receiverFixture(t, base+"/api/v1/write")
	pushAndWait(t, p)
	const q = "kubezonnet_pod_pair_bytes_total"
	checkValues(t, instantQuery(t, base, q), src, pairs)

	// Grow one counter, drop another: the drop sends a stale marker.
	src.add(pairs["api-2"], 1000)
	src.remove(pairs["api-1"])
	delete(pairs, "api-1")
	pushAndWait(t, p)
	checkValues(t, instantQuery(t, base, q), src, pairs)
}

func TestRealVictoriaMetrics(t *testing.T) {
	bin := requireBinary(t, "/usr/bin/victoria-metrics")
	addr := freeAddr(t)
	base := "http://" + addr
	startProcess(t, base+"/health", bin,
		"-httpListenAddr="+addr,
		"-storageDataPath="+filepath.Join(t.TempDir(), "vm"),
		"-search.disableCache",
		"-search.latencyOffset=0s",
		"-loggerLevel=ERROR")

	p, src, pairs := receiverFixture(t, base+"/api/v1/write")
	pushAndWait(t, p)
	const q = "kubezonnet_pod_pair_bytes_total"
	checkValues(t, vmQuery(t, base, q, src, pairs), src, pairs)

	src.add(pairs["api-2"], 1000)
	pushAndWait(t, p)
	checkValues(t, vmQuery(t, base, q, src, pairs), src, pairs)
}

// vmQuery queries VictoriaMetrics until it shows the source's values or
// ten seconds pass: even after /internal/force_flush, 1.79 makes rows
// searchable up to a second later. The caller then checks what came back.
func vmQuery(t *testing.T, base, q string, src *testSource, pairs map[string][]metrics.Label) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		forceFlush(t, base)
		got := instantQuery(t, base, q)
		match := len(got) == len(pairs)
		for pod, ls := range pairs {
			match = match && got[pod] == src.value(ls)
		}
		if match || time.Now().After(deadline) {
			return got
		}
		time.Sleep(100 * time.Millisecond) // the poll interval
	}
}

// forceFlush makes VictoriaMetrics' freshly ingested samples searchable.
func forceFlush(t *testing.T, base string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/internal/force_flush", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("force_flush: %s", resp.Status)
	}
}

// scalarQuery runs a PromQL instant query evaluated at the given time and
// returns its only value; ok is false when the result is empty.
func scalarQuery(t *testing.T, base, query string, at time.Time) (v float64, ok bool) {
	t.Helper()
	q := url.Values{"query": {query}, "time": {strconv.FormatFloat(float64(at.UnixMilli())/1000, 'f', 3, 64)}}
	var r struct {
		Data struct {
			Result []struct{ Value [2]any }
		}
	}
	getQuery(t, base+"/api/v1/query?"+q.Encode(), query, &r)
	switch len(r.Data.Result) {
	case 0:
		return 0, false
	case 1:
	default:
		t.Fatalf("query %s: %d series, want 1: %v", query, len(r.Data.Result), r.Data.Result)
	}
	str, _ := r.Data.Result[0].Value[1].(string)
	v, err := strconv.ParseFloat(str, 64)
	if err != nil {
		t.Fatalf("query %s: value %v: %v", query, r.Data.Result[0].Value[1], err)
	}
	return v, true
}

// TestRealPrometheusIncreaseSeesBurst is what created-timestamp zeros are
// for: a pod pair that sends a burst of N bytes shortly after it appears,
// all before the first push, must show N in sum(increase(...)), which
// Prometheus only computes between samples. Without the zero the first
// sample already holds N and increase() sees nothing; the second series
// (Created 0) shows that, so the test fails if zeros are not sent. It then
// restarts the pusher (an empty series table, as after a server restart)
// with the same Created: Prometheus rejects the zero as out of order with
// a 400 for the whole request, the fallback gets the samples in, and
// increase() is unchanged.
//
// The arithmetic, after Prometheus' extrapolatedRate: C is the creation
// time, the pushes stamp t1 = C+10s, t2 = t1+15s, t3 = t1+30s and
// t4 = t1+45s, all with value N, and the query is evaluated at t4 over
// [2m], so the range starts at t4-120s = C-65s, before every sample. The
// series with a zero has the points 0@C, N@t1..t4: increase is N - 0 = N
// over the sampled interval t4-C = 55s, before extrapolation. Prometheus
// extrapolates to each edge of the range if the edge is within 1.1 times
// the average interval (55s/4 = 13.75s, so 15.125s) of a sample, else by
// half an interval; but for a counter it never extrapolates the start past
// where the counter would be zero, which is at C itself since the first
// point is 0, so the start adds 0s. The end of the range is t4, the last
// sample, so it adds 0s too: the result is exactly N (an evaluation even
// 5s later would extrapolate to N*60/55, 9% over). The series without a
// zero has N@t1..t4: increase N - N = 0. After the restart a fifth push
// stamps t5 = t4+15s; evaluated at t5 the range starts at C-60s, and the
// same reasoning gives N again.
func TestRealPrometheusIncreaseSeesBurst(t *testing.T) {
	base := startPrometheus(t)
	const burst = 1_234_567.0
	// Whole seconds some minutes back: within the TSDB head's window of
	// accepted samples, and exact in the query's time parameter.
	created := time.Now().Add(-10 * time.Minute).Truncate(time.Second)
	t1 := created.Add(10 * time.Second)
	stamps := []time.Time{t1, t1.Add(15 * time.Second), t1.Add(30 * time.Second), t1.Add(45 * time.Second)}
	withCT := podPair("kubezonnet_pod_pair_bytes_total", "api-ct", "db-0")
	withoutCT := podPair("kubezonnet_pod_pair_bytes_total", "api-noct", "db-0")
	src := SourceFunc(func(dst []Series) []Series {
		return append(dst,
			Series{Labels: withCT, Value: burst, Created: created.UnixMilli()},
			Series{Labels: withoutCT, Value: burst})
	})
	cfg := testConfig(base + "/api/v1/write")
	cfg.Shards = 1 // one request per push: the restart's 400 hits both series
	newPusher := func() (*Pusher, *metrics.Registry, *atomic.Int64) {
		reg := metrics.New()
		p := newTestPusher(t, cfg, reg, nil, src)
		return p, reg, setClock(p, 0)
	}
	p, reg, clock := newPusher()
	for _, at := range stamps {
		clock.Store(at.UnixMilli())
		pushAndWait(t, p)
	}
	if v := metricValue(t, reg, "kubezonnet_server_remote_write_samples_total", "result", "sent"); v != 8 {
		t.Fatalf("samples sent = %v, want 8 (two series, four pushes)", v)
	}
	if v := metricValue(t, reg, "kubezonnet_server_remote_write_zero_samples_total"); v != 1 {
		t.Errorf("zero samples = %v, want 1", v)
	}
	increase := func(pod string, at time.Time) float64 {
		t.Helper()
		q := fmt.Sprintf(`sum(increase(kubezonnet_pod_pair_bytes_total{src_pod=%q}[2m]))`, pod)
		v, ok := scalarQuery(t, base, q, at)
		if !ok {
			t.Fatalf("%s at %v: no result", q, at)
		}
		return v
	}
	last := stamps[len(stamps)-1]
	got, gotNoCT := increase("api-ct", last), increase("api-noct", last)
	t.Logf("increase over the burst of %v: %v with a created-timestamp zero, %v without", burst, got, gotNoCT)
	if math.Abs(got-burst) > 0.02*burst {
		t.Errorf("increase with a created-timestamp zero = %v, want %v within 2%%", got, burst)
	}
	if gotNoCT > burst/2 {
		t.Errorf("increase without a zero = %v, want far below %v (the burst is in the first sample)", gotNoCT, burst)
	}

	// A restarted pusher knows no series and sends the zero again.
	p2, reg2, clock2 := newPusher()
	t5 := last.Add(15 * time.Second)
	clock2.Store(t5.UnixMilli())
	pushAndWait(t, p2)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"kubezonnet_server_remote_write_zero_samples_rejected_total", nil, 1},
		{"kubezonnet_server_remote_write_requests_total", []string{"code", "400"}, 1},
		{"kubezonnet_server_remote_write_samples_total", []string{"result", "sent"}, 2},
		{"kubezonnet_server_remote_write_samples_total", []string{"result", "dropped"}, 0},
	} {
		if v := metricValue(t, reg2, c.name, c.labels...); v != c.want {
			t.Errorf("after the restart: %s%v = %v, want %v", c.name, c.labels, v, c.want)
		}
	}
	if got := increase("api-ct", t5); math.Abs(got-burst) > 0.02*burst {
		t.Errorf("after the restart: increase = %v, want %v within 2%%", got, burst)
	}
	if v, ok := scalarQuery(t, base, `sum(kubezonnet_pod_pair_bytes_total{src_pod="api-ct"})`, t5); !ok || v != burst {
		t.Errorf("after the restart: value at t5 = %v (found %v), want %v from the fallback", v, ok, burst)
	}
}
