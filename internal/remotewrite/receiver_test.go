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
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
)

// requireBinary returns path, failing as root (CI) and skipping otherwise
// when it is missing.
func requireBinary(t *testing.T, path string) string {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		if os.Geteuid() == 0 {
			t.Fatalf("%s missing (%v): CI installs it, install the Debian package", path, err)
		}
		t.Skipf("%s missing: %v", path, err)
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
		time.Sleep(50 * time.Millisecond)
	}
}

// instantQuery runs a PromQL instant query and returns value by src_pod.
func instantQuery(t *testing.T, base, query string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(base + "/api/v1/query?query=" + url.QueryEscape(query))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("query %s: %s: %s", query, resp.Status, body)
	}
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
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("query %s: %v: %s", query, err, body)
	}
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

func TestRealPrometheus(t *testing.T) {
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
		time.Sleep(100 * time.Millisecond)
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
