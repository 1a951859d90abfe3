package server

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang/snappy"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/logging"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/wire"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

const testToken = "s3cret-token"

// testEnv is a server behind a real HTTP listener on 127.0.0.1.
type testEnv struct {
	srv *Server
	url string
	reg *metrics.Registry
	res *fakeResolver
}

func testConfig() Config {
	return Config{
		MaxPodPairs:       1000,
		SeriesIdleTimeout: time.Hour,
		MaxBodyBytes:      1 << 20,
		IncarnationTTL:    time.Hour,
		MaxIncarnations:   100,
		MaxAgentSeries:    1000,
	}
}

func newTestEnv(t *testing.T, cfg Config, auth authenticator) *testEnv {
	t.Helper()
	res := newFakeResolver()
	res.add("10.0.1.1", podEP("shop", "web-1", "web", "Deployment", "node-a", "zone-a"))
	res.add("10.0.1.2", podEP("shop", "web-2", "web", "Deployment", "node-a", "zone-a"))
	res.add("10.0.2.1", podEP("shop", "db-0", "db", "StatefulSet", "node-b", "zone-b"))
	res.add("10.0.1.9", podEP("shop", "cache-0", "cache", "StatefulSet", "node-a", "zone-a"))
	reg := metrics.New()
	srv, err := newServer(&cfg, deps{resolver: res, auth: auth, reg: reg, log: logging.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(hs.Close)
	return &testEnv{srv: srv, url: hs.URL, reg: reg, res: res}
}

func tokenAuth(t *testing.T) *tokenFile {
	t.Helper()
	path := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(path, []byte(testToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tf, err := newTokenFile(path, time.Second, logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	return tf
}

func rec(src, dst string, port uint16, bytes, packets uint64) flow.Record {
	return flow.Record{
		Key:    flow.Key{Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr(dst), Proto: 6, Port: port, PortIsDst: true},
		Counts: flow.Counts{Bytes: bytes, Packets: packets},
	}
}

func batch(node string, seq uint64, flows ...flow.Record) *wire.Batch {
	return &wire.Batch{Node: node, Incarnation: "1a2b", Seq: seq, Time: time.UnixMilli(1_700_000_000_000), Flows: flows}
}

func encode(b *wire.Batch) []byte {
	var e wire.Encoder
	return bytes.Clone(e.Encode(b))
}

type req struct {
	method, contentType, encoding, token string
	body                                 []byte
}

func (e *testEnv) do(t *testing.T, r req) (int, string) {
	t.Helper()
	if r.method == "" {
		r.method = http.MethodPost
	}
	hr, err := http.NewRequest(r.method, e.url+"/api/v1/write", bytes.NewReader(r.body))
	if err != nil {
		t.Fatal(err)
	}
	if r.contentType != "-" {
		hr.Header.Set("Content-Type", cmpOr(r.contentType, remotewrite.ContentType))
	}
	if r.encoding != "-" {
		hr.Header.Set("Content-Encoding", cmpOr(r.encoding, remotewrite.ContentEncoding))
	}
	if r.token != "-" {
		hr.Header.Set("Authorization", "Bearer "+cmpOr(r.token, testToken))
	}
	resp, err := http.DefaultClient.Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(msg)
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// series renders every series the server would push from its aggregates.
func (e *testEnv) series() []string {
	var out []string
	for _, s := range e.srv.agg.AppendSeries(nil) {
		out = append(out, fmtSeries(s))
	}
	slices.Sort(out)
	return out
}

func fmtSeries(s remotewrite.Series) string {
	var b strings.Builder
	b.WriteString(s.Labels[0].Value + "{")
	for i, l := range s.Labels[1:] {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%q", l.Name, l.Value)
	}
	fmt.Fprintf(&b, "} %g", s.Value)
	return b.String()
}

// metric returns the value of a self-metric series with the given label
// (name=value, or "" for none); -1 if absent.
func (e *testEnv) metric(name, label string) float64 {
	v := -1.0
	e.reg.Each(func(n string, ls []metrics.Label, value float64) {
		if n != name {
			return
		}
		if label == "" || slices.ContainsFunc(ls, func(l metrics.Label) bool { return l.Name+"="+l.Value == label }) {
			v = value
		}
	})
	return v
}

const webToDB = `class="cross-zone",dst_kind="pod",dst_namespace="shop",dst_pod="db-0",dst_workload="db",dst_workload_kind="StatefulSet",dst_zone="zone-b",src_kind="pod",src_namespace="shop",src_pod="web-1",src_workload="web",src_workload_kind="Deployment",src_zone="zone-a"`

func TestIngestAppliesOnce(t *testing.T) {
	env := newTestEnv(t, testConfig(), tokenAuth(t))
	body := encode(batch("node-a", 1,
		rec("10.0.1.1", "10.0.2.1", 5432, 1500, 3),
		rec("10.0.1.1", "10.0.1.9", 6379, 400, 2)))
	want := []string{
		`kubezonnet_pod_pair_bytes_total{` + webToDB + `} 1500`,
		`kubezonnet_pod_pair_packets_total{` + webToDB + `} 3`,
		`kubezonnet_zone_pair_bytes_total{dst_zone="zone-a",src_zone="zone-a"} 400`,
		`kubezonnet_zone_pair_bytes_total{dst_zone="zone-b",src_zone="zone-a"} 1500`,
		`kubezonnet_zone_pair_packets_total{dst_zone="zone-a",src_zone="zone-a"} 2`,
		`kubezonnet_zone_pair_packets_total{dst_zone="zone-b",src_zone="zone-a"} 3`,
		`pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-1"} 1500`,
	}
	for i := range 3 { // the original, then two retries of the same batch
		if code, msg := env.do(t, req{body: body}); code != http.StatusNoContent {
			t.Fatalf("request %d: %d %s", i, code, msg)
		}
		if got := env.series(); !slices.Equal(got, want) {
			t.Fatalf("after request %d:\n got %s\nwant %s", i, strings.Join(got, "\n     "), strings.Join(want, "\n     "))
		}
	}
	if v := env.metric("kubezonnet_server_duplicate_batches_total", ""); v != 2 {
		t.Errorf("duplicates = %v, want 2", v)
	}
	// The next seq is applied; an older one (a late duplicate) is not.
	if code, msg := env.do(t, req{body: encode(batch("node-a", 2, rec("10.0.1.1", "10.0.2.1", 5432, 100, 1)))}); code != http.StatusNoContent {
		t.Fatalf("seq 2: %d %s", code, msg)
	}
	if code, msg := env.do(t, req{body: encode(batch("node-a", 1, rec("10.0.1.1", "10.0.2.1", 5432, 999, 9)))}); code != http.StatusNoContent {
		t.Fatalf("late seq 1: %d %s", code, msg)
	}
	if got := env.series(); !slices.Contains(got, `kubezonnet_pod_pair_bytes_total{`+webToDB+`} 1600`) {
		t.Errorf("after seq 2 and a late seq 1:\n%s", strings.Join(got, "\n"))
	}
	// Another incarnation of the same node starts again at seq 1.
	b := batch("node-a", 1, rec("10.0.1.1", "10.0.2.1", 5432, 10, 1))
	b.Incarnation = "ffff"
	if code, msg := env.do(t, req{body: encode(b)}); code != http.StatusNoContent {
		t.Fatalf("new incarnation: %d %s", code, msg)
	}
	if got := env.series(); !slices.Contains(got, `kubezonnet_pod_pair_bytes_total{`+webToDB+`} 1610`) {
		t.Errorf("after new incarnation:\n%s", strings.Join(got, "\n"))
	}
	if v := env.metric("kubezonnet_server_ingest_requests_total", "code=204"); v != 6 {
		t.Errorf("204 responses = %v, want 6", v)
	}
}

// TestIngestRefusesUntilSynced: a server that has just started answers 503
// (which agents retry) until its resolver has synced, and applies nothing
// meanwhile; the same batch is then applied once.
func TestIngestRefusesUntilSynced(t *testing.T) {
	env := newTestEnv(t, testConfig(), tokenAuth(t))
	env.res.unsynced.Store(true)
	body := encode(batch("node-a", 1, rec("10.0.1.1", "10.0.2.1", 5432, 1500, 3)))
	for range 2 {
		if code, msg := env.do(t, req{body: body}); code != http.StatusServiceUnavailable || !strings.Contains(msg, "not synced") {
			t.Fatalf("before sync: %d %q, want 503 saying not synced", code, msg)
		}
	}
	if got := env.series(); slices.ContainsFunc(got, func(s string) bool { return strings.HasPrefix(s, "kubezonnet_pod_pair_bytes_total") }) {
		t.Fatalf("applied before sync:\n%s", strings.Join(got, "\n"))
	}
	if v := env.metric("kubezonnet_server_ingest_rejected_total", "reason=not_synced"); v != 2 {
		t.Errorf("not_synced refusals = %v, want 2", v)
	}
	env.res.unsynced.Store(false)
	if code, msg := env.do(t, req{body: body}); code != http.StatusNoContent {
		t.Fatalf("after sync: %d %s", code, msg)
	}
	if got := env.series(); !slices.Contains(got, `kubezonnet_pod_pair_bytes_total{`+webToDB+`} 1500`) {
		t.Errorf("after sync:\n%s", strings.Join(got, "\n"))
	}
}

func TestIngestRefusals(t *testing.T) {
	valid := encode(batch("node-a", 1, rec("10.0.1.1", "10.0.2.1", 5432, 1500, 3)))
	manyFlows := make([]flow.Record, 70) // one series per flow
	for i := range manyFlows {
		manyFlows[i] = rec("10.0.1.1", "10.0.2.1", uint16(1000+i), 1, 1)
	}
	longLabel := batch("node-a", 1)
	longLabel.Incarnation = strings.Repeat("x", 300)
	bigBody := encode(batch("node-a", 1, make100k()...))

	for _, tc := range []struct {
		name   string
		req    req
		code   int
		reason string
		msg    string
	}{
		{"GET", req{method: http.MethodGet, body: valid}, 405, reasonMethod, "method GET not allowed"},
		{"no content type", req{contentType: "-", body: valid}, 415, reasonContentType, `content type "" not supported`},
		{"json", req{contentType: "application/json", body: valid}, 415, reasonContentType, `content type "application/json" not supported`},
		{"remote-write 2.0", req{contentType: "application/x-protobuf;proto=io.prometheus.write.v2.Request", body: valid}, 415, reasonContentType, "remote-write 1.0"},
		{"no encoding", req{encoding: "-", body: valid}, 415, reasonContentEncoding, `content encoding "" not supported`},
		{"gzip", req{encoding: "gzip", body: valid}, 415, reasonContentEncoding, `content encoding "gzip" not supported`},
		{"no token", req{token: "-", body: valid}, 401, reasonUnauthenticated, "missing bearer token"},
		{"bad token", req{token: "nope", body: valid}, 401, reasonUnauthenticated, "invalid bearer token"},
		{"body too large", req{body: bigBody}, 413, reasonBodyTooLarge, "request body exceeds 65536 bytes"},
		{"too many series", req{body: encode(batch("node-a", 1, manyFlows...))}, 413, reasonLimit, "more than 64 series"},
		{"label too long", req{body: encode(longLabel)}, 413, reasonLimit, "longer than 256 bytes"},
		{"not snappy", req{body: []byte("\xff\xff\xff\xff\xff\xff\xff")}, 400, reasonMalformed, "snappy"},
		{"not protobuf", req{body: snappy.Encode(nil, []byte("\x0a\xff\xff\xff"))}, 400, reasonMalformed, "malformed remote-write request"},
		{"empty request", req{body: snappy.Encode(nil, nil)}, 400, reasonMalformed, "empty request"},
		{"no batch header", req{body: handBuilt(t, false, 1500, 3)}, 400, reasonMalformed, "first series is"},
		{"flow with one sample", req{body: handBuilt(t, true, 1500)}, 400, reasonMalformed, "kubezonnet_flow series has 1 samples, want 2"},
		{"flow with negative bytes", req{body: handBuilt(t, true, -1500, 3)}, 400, reasonMalformed, "not a count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.MaxBodyBytes = 64 << 10
			cfg.Limits = wire.Limits{MaxSeries: 64, MaxLabelLength: 256}
			env := newTestEnv(t, cfg, tokenAuth(t))
			code, msg := env.do(t, tc.req)
			if code != tc.code || !strings.Contains(msg, tc.msg) {
				t.Fatalf("got %d %q, want %d with %q", code, msg, tc.code, tc.msg)
			}
			if got := env.series(); len(got) != 0 {
				t.Errorf("refused request recorded series: %v", got)
			}
			if v := env.metric("kubezonnet_server_ingest_rejected_total", "reason="+tc.reason); v != 1 {
				t.Errorf("rejected{reason=%s} = %v, want 1", tc.reason, v)
			}
			if v := env.metric("kubezonnet_server_ingest_requests_total", fmt.Sprintf("code=%d", tc.code)); v != 1 {
				t.Errorf("requests{code=%d} = %v, want 1", tc.code, v)
			}
			// The server keeps serving, and the refused request claimed
			// nothing: a valid seq 1 is applied.
			if code, msg := env.do(t, req{body: valid}); code != http.StatusNoContent {
				t.Fatalf("valid request after refusal: %d %s", code, msg)
			}
			if got := env.series(); !slices.Contains(got, `kubezonnet_pod_pair_bytes_total{`+webToDB+`} 1500`) {
				t.Errorf("valid request after refusal not applied: %v", got)
			}
		})
	}
}

// make100k returns flows whose encoding is far above 64 KiB.
func make100k() []flow.Record {
	out := make([]flow.Record, 0, 20000)
	for i := range 20000 {
		src := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		out = append(out, flow.Record{Key: flow.Key{Src: src, Dst: netip.MustParseAddr("10.0.2.1"), Proto: 17, Port: uint16(i)},
			Counts: flow.Counts{Bytes: uint64(i), Packets: 1}})
	}
	return out
}

// handBuilt is a well-formed remote-write request with one flow series of
// the given sample values, after a batch header if header: without the
// header, or with other than two samples, it breaks the wire contract.
func handBuilt(t *testing.T, header bool, samples ...float64) []byte {
	t.Helper()
	var sb remotewrite.SeriesBuilder
	var raw []byte
	if header {
		sb.Label("__name__", wire.MetricBatch)
		sb.Label("incarnation", "1a2b")
		sb.Label("node", "node-a")
		sb.Label("seq", "1")
		sb.Sample(1, 1_700_000_000_000)
		raw = sb.AppendTo(raw)
	}
	sb.Reset()
	sb.Label("__name__", wire.MetricFlow)
	sb.Label("dport", "5432")
	sb.Label("dst", "10.0.2.1")
	sb.Label("proto", "tcp")
	sb.Label("src", "10.0.1.1")
	for _, v := range samples {
		sb.Sample(v, 0)
	}
	return snappy.Encode(nil, sb.AppendTo(raw))
}

func TestForeignSourceDropped(t *testing.T) {
	env := newTestEnv(t, testConfig(), noAuth{})
	// node-b reports a flow from web-1, which lives on node-a: dropped.
	// Its own db-0 flow, and a flow from an address nobody owns, count.
	body := encode(batch("node-b", 1,
		rec("10.0.1.1", "10.0.2.1", 5432, 1500, 3),
		rec("10.0.2.1", "10.0.1.1", 5432, 700, 2),
		rec("192.168.7.7", "10.0.1.1", 80, 5, 1)))
	if code, msg := env.do(t, req{body: body}); code != http.StatusNoContent {
		t.Fatalf("%d %s", code, msg)
	}
	if v := env.metric("kubezonnet_server_flows_dropped_total", "reason=foreign_source"); v != 1 {
		t.Errorf("foreign_source drops = %v, want 1", v)
	}
	if v := env.metric("kubezonnet_server_flows_total", ""); v != 2 {
		t.Errorf("flows applied = %v, want 2", v)
	}
	if v := env.metric("kubezonnet_server_unresolved_total", "reason=no_pod"); v != 1 {
		t.Errorf("unresolved no_pod = %v, want 1", v)
	}
	got := env.series()
	// The flow from the unknown address is a pair too (unknown pairs are
	// tracked by default, as the README's series table says).
	want := []string{
		`kubezonnet_pod_pair_bytes_total{class="cross-zone",dst_kind="pod",dst_namespace="shop",dst_pod="web-1",dst_workload="web",dst_workload_kind="Deployment",dst_zone="zone-a",src_kind="pod",src_namespace="shop",src_pod="db-0",src_workload="db",src_workload_kind="StatefulSet",src_zone="zone-b"} 700`,
		`kubezonnet_pod_pair_bytes_total{class="unknown",dst_kind="pod",dst_namespace="shop",dst_pod="web-1",dst_workload="web",dst_workload_kind="Deployment",dst_zone="zone-a",src_kind="unknown",src_workload="unknown",src_workload_kind="Unknown",src_zone="unknown"} 5`,
		`kubezonnet_pod_pair_packets_total{class="cross-zone",dst_kind="pod",dst_namespace="shop",dst_pod="web-1",dst_workload="web",dst_workload_kind="Deployment",dst_zone="zone-a",src_kind="pod",src_namespace="shop",src_pod="db-0",src_workload="db",src_workload_kind="StatefulSet",src_zone="zone-b"} 2`,
		`kubezonnet_pod_pair_packets_total{class="unknown",dst_kind="pod",dst_namespace="shop",dst_pod="web-1",dst_workload="web",dst_workload_kind="Deployment",dst_zone="zone-a",src_kind="unknown",src_workload="unknown",src_workload_kind="Unknown",src_zone="unknown"} 1`,
		`kubezonnet_zone_pair_bytes_total{dst_zone="zone-a",src_zone="unknown"} 5`,
		`kubezonnet_zone_pair_bytes_total{dst_zone="zone-a",src_zone="zone-b"} 700`,
		`kubezonnet_zone_pair_packets_total{dst_zone="zone-a",src_zone="unknown"} 1`,
		`kubezonnet_zone_pair_packets_total{dst_zone="zone-a",src_zone="zone-b"} 2`,
		`pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="db-0"} 700`,
	}
	if !slices.Equal(got, want) {
		t.Errorf("series:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
	}
}

func TestAgentMetricsForwarded(t *testing.T) {
	env := newTestEnv(t, testConfig(), noAuth{})
	b := batch("node-a", 1)
	b.Metrics = []wire.Metric{
		{Name: "kubezonnet_agent_flows_total", Value: 42},
		{Name: "kubezonnet_agent_dropped_total", Labels: []wire.Label{{Name: "reason", Value: "map_full"}}, Value: 3},
	}
	if code, msg := env.do(t, req{body: encode(b)}); code != http.StatusNoContent {
		t.Fatalf("%d %s", code, msg)
	}
	b.Seq, b.Metrics[0].Value = 2, 50
	if code, msg := env.do(t, req{body: encode(b)}); code != http.StatusNoContent {
		t.Fatalf("%d %s", code, msg)
	}
	var got []string
	for _, s := range env.srv.agents.AppendSeries(nil) {
		got = append(got, fmtSeries(s))
	}
	slices.Sort(got)
	want := []string{
		`kubezonnet_agent_dropped_total{node="node-a",reason="map_full"} 3`,
		`kubezonnet_agent_flows_total{node="node-a"} 50`,
	}
	if !slices.Equal(got, want) {
		t.Errorf("agent series:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
	}
}

func TestTokenFileReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(path, []byte("old-token"), 0o600); err != nil {
		t.Fatal(err)
	}
	tf, err := newTokenFile(path, 5*time.Second, logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tf.now = func() time.Time { return now }
	env := newTestEnv(t, testConfig(), tf)
	body := encode(batch("node-a", 1))
	if code, _ := env.do(t, req{token: "old-token", body: body}); code != 204 {
		t.Fatalf("old token: %d", code)
	}
	if err := os.WriteFile(path, []byte("new-token-longer\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Within the recheck interval the file is not looked at.
	if code, _ := env.do(t, req{token: "new-token-longer", body: encode(batch("node-a", 2))}); code != 401 {
		t.Fatalf("new token before recheck: %d, want 401", code)
	}
	now = now.Add(6 * time.Second)
	if code, msg := env.do(t, req{token: "new-token-longer", body: encode(batch("node-a", 2))}); code != 204 {
		t.Fatalf("new token after recheck: %d %s", code, msg)
	}
	if code, _ := env.do(t, req{token: "old-token", body: encode(batch("node-a", 3))}); code != 401 {
		t.Fatalf("old token after rotation: %d, want 401", code)
	}
	// An emptied file keeps the last good token.
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	now = now.Add(6 * time.Second)
	if code, _ := env.do(t, req{token: "new-token-longer", body: encode(batch("node-a", 3))}); code != 204 {
		t.Fatalf("token after file emptied: %d, want 204", code)
	}
}

func TestHealthAndReady(t *testing.T) {
	res := newFakeResolver()
	cfg := testConfig()
	refused := fmt.Errorf("%w: nodes: dial tcp 127.0.0.1:1: connect: connection refused", resolve.ErrNotSynced)
	for _, tc := range []struct {
		name    string
		syncErr error
		code    int
		msg     string
	}{
		{"synced", nil, 200, "ok"},
		{"not synced, no failure yet", resolve.ErrNotSynced, 503, "not ready: resolver informers not synced yet"},
		// The reason is in the body, for whoever looks at a failing probe.
		{"not synced, API server refuses", refused, 503, "not synced yet: nodes: dial tcp 127.0.0.1:1: connect: connection refused"},
	} {
		srv, err := newServer(&cfg, deps{resolver: res, auth: noAuth{}, reg: metrics.New(), log: logging.Discard(),
			ready: readiness(func() error { return tc.syncErr })})
		if err != nil {
			t.Fatal(err)
		}
		hs := httptest.NewServer(srv.Handler())
		t.Cleanup(hs.Close)
		code, msg := get(t, hs.URL+"/readyz")
		if code != tc.code || !strings.Contains(msg, tc.msg) {
			t.Errorf("%s: readyz %d %q, want %d %q", tc.name, code, msg, tc.code, tc.msg)
		}
		if code, _ := get(t, hs.URL+"/healthz"); code != 200 {
			t.Errorf("healthz: %d", code)
		}
		if code, msg := get(t, hs.URL+"/metrics"); code != 200 || !strings.Contains(msg, "kubezonnet_server_ingest_requests_total") {
			t.Errorf("metrics: %d %q", code, msg)
		}
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestConcurrentDuplicates sends every batch from two goroutines at once
// (an agent retry racing its original) while the pusher reads snapshots:
// each batch must count exactly once.
func TestConcurrentDuplicates(t *testing.T) {
	env := newTestEnv(t, testConfig(), noAuth{})
	const batches = 30
	bodies := make([][]byte, batches)
	for i := range bodies {
		bodies[i] = encode(batch("node-a", uint64(i+1), rec("10.0.1.1", "10.0.2.1", 5432, 100, 1)))
	}
	errs := make(chan string, 2*batches)
	done := make(chan struct{})
	go func() { // a concurrent reader, as the pusher is
		defer close(done)
		for range 50 {
			env.srv.agg.AppendSeries(nil)
		}
	}()
	for i := range bodies {
		var wg sync.WaitGroup
		for range 2 {
			wg.Go(func() {
				resp, err := http.Post(env.url+"/api/v1/write", remotewrite.ContentType, bytes.NewReader(bodies[i]))
				if err != nil {
					errs <- err.Error()
					return
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusUnsupportedMediaType {
					errs <- fmt.Sprintf("no encoding header: %d", resp.StatusCode)
				}
				code, msg := env.do(t, req{body: bodies[i]})
				if code != http.StatusNoContent {
					errs <- fmt.Sprintf("%d %s", code, msg)
				}
			})
		}
		wg.Wait()
	}
	<-done
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if got := env.series(); !slices.Contains(got, fmt.Sprintf(`kubezonnet_pod_pair_bytes_total{%s} %d`, webToDB, 100*batches)) {
		t.Errorf("want %d bytes once per batch:\n%s", 100*batches, strings.Join(got, "\n"))
	}
	if v := env.metric("kubezonnet_server_duplicate_batches_total", ""); v != batches {
		t.Errorf("duplicates = %v, want %d", v, batches)
	}
}
