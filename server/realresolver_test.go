package server

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/kubezonnet/kubezonnet/internal/logging"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/wire"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// The tests in this file wire ingest to the real resolve.Resolver, fed by
// client-go's fake clientset (no API server can run in unit tests here):
// what the command does, minus the HTTP client to Kubernetes.

func node(name, zone, ip string) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			"topology.kubernetes.io/zone": zone, "topology.kubernetes.io/region": "r1"}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}},
	}
}

func statefulPod(ns, name, owner, nodeName, ip string) *corev1.Pod {
	yes := true
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + ns + "-" + name),
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "StatefulSet", Name: owner, Controller: &yes}}},
		Spec: corev1.PodSpec{NodeName: nodeName},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
			StartTime: &metav1.Time{Time: time.Unix(1_600_000_000, 0)}},
	}
}

// realResolver starts a resolver over objs and waits for its informers.
func realResolver(tb testing.TB, objs ...runtime.Object) *resolve.Resolver {
	tb.Helper()
	return realResolverOn(tb, fake.NewClientset(objs...), resolve.Config{ReleasedIPTTL: time.Minute, ReleasedIPCacheSize: 1024})
}

// realEnv serves a server over res on 127.0.0.1, with test defaults.
func realEnv(t *testing.T, res *resolve.Resolver) *testEnv {
	t.Helper()
	cfg := testConfig()
	reg := metrics.New()
	srv, err := newServer(&cfg, deps{resolver: res, auth: noAuth{}, reg: reg, log: logging.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	return &testEnv{srv: srv, url: startHTTP(t, srv.Handler()), reg: reg}
}

// realResolverOn is realResolver over a clientset the test changes.
func realResolverOn(tb testing.TB, client *fake.Clientset, cfg resolve.Config) *resolve.Resolver {
	tb.Helper()
	res, err := resolve.New(cfg, client, logging.Discard())
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- res.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		<-done
	})
	// Waiting for the informers, not timing them: the deadline only turns
	// a hang into a failure.
	deadline := time.Now().Add(time.Minute)
	for !res.HasSynced() {
		if time.Now().After(deadline) {
			tb.Fatal("resolver informers did not sync")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return res
}

func TestIngestWithRealResolver(t *testing.T) {
	res := realResolver(t,
		node("node-a", "zone-a", "192.168.0.1"), node("node-b", "zone-b", "192.168.0.2"),
		statefulPod("shop", "web-0", "web", "node-a", "10.0.1.1"),
		statefulPod("shop", "db-0", "db", "node-b", "10.0.2.1"))
	env := realEnv(t, res)
	// node-a reports: web->db (cross-zone), db->web (db is on node-b: a
	// foreign source, dropped), web->public address (external), and the
	// node itself -> db (host network, cross-zone).
	b := batch("node-a", 1,
		rec("10.0.1.1", "10.0.2.1", 5432, 1000, 10),
		rec("10.0.2.1", "10.0.1.1", 5432, 77, 7),
		rec("10.0.1.1", "1.1.1.1", 443, 300, 3),
		rec("192.168.0.1", "10.0.2.1", 5432, 50, 1))
	b.Time = time.Now()
	if code, msg := env.do(t, req{body: encode(b)}); code != http.StatusNoContent {
		t.Fatalf("%d %s", code, msg)
	}
	pair := func(name, class, dst, src string, v int) string {
		return fmt.Sprintf("%s{class=%q,%s,%s} %d", name, class, dst, src, v)
	}
	webSrc := `src_kind="pod",src_namespace="shop",src_pod="web-0",src_workload="web",src_workload_kind="StatefulSet",src_zone="zone-a"`
	nodeSrc := `src_kind="node",src_workload="node-a",src_workload_kind="Node",src_zone="zone-a"`
	dbDst := `dst_kind="pod",dst_namespace="shop",dst_pod="db-0",dst_workload="db",dst_workload_kind="StatefulSet",dst_zone="zone-b"`
	extDst := `dst_kind="external",dst_workload="external",dst_workload_kind="External",dst_zone="external"`
	want := []string{
		pair("kubezonnet_pod_pair_bytes_total", "cross-zone", dbDst, nodeSrc, 50),
		pair("kubezonnet_pod_pair_bytes_total", "cross-zone", dbDst, webSrc, 1000),
		pair("kubezonnet_pod_pair_bytes_total", "external", extDst, webSrc, 300),
		pair("kubezonnet_pod_pair_packets_total", "cross-zone", dbDst, nodeSrc, 1),
		pair("kubezonnet_pod_pair_packets_total", "cross-zone", dbDst, webSrc, 10),
		pair("kubezonnet_pod_pair_packets_total", "external", extDst, webSrc, 3),
		`kubezonnet_zone_pair_bytes_total{dst_zone="external",src_zone="zone-a"} 300`,
		`kubezonnet_zone_pair_bytes_total{dst_zone="zone-b",src_zone="zone-a"} 1050`,
		`kubezonnet_zone_pair_packets_total{dst_zone="external",src_zone="zone-a"} 3`,
		`kubezonnet_zone_pair_packets_total{dst_zone="zone-b",src_zone="zone-a"} 11`,
		`pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-0"} 1000`,
	}
	slices.Sort(want)
	if got := env.series(); !slices.Equal(got, want) {
		t.Errorf("series:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
	}
	if v := env.metric("kubezonnet_server_flows_dropped_total", "reason=foreign_source"); v != 1 {
		t.Errorf("foreign_source drops = %v, want 1", v)
	}
}

// startHTTP serves h on 127.0.0.1 for the test.
func startHTTP(t *testing.T, h http.Handler) string {
	t.Helper()
	hs := httptest.NewServer(h)
	t.Cleanup(hs.Close)
	return hs.URL
}

// BenchmarkIngestPathRealResolver is BenchmarkIngestPath with the real
// resolver (informers over the fake clientset) holding 10,000 pods.
func BenchmarkIngestPathRealResolver(b *testing.B) {
	objs := make([]runtime.Object, 0, benchPods+benchNodes)
	for n := range benchNodes {
		objs = append(objs, node(fmt.Sprintf("node-%d", n), fmt.Sprintf("zone-%d", n%benchZones),
			netip.AddrFrom4([4]byte{192, 168, byte(n >> 8), byte(n)}).String()))
	}
	_, addrs := benchResolver()
	for i, a := range addrs {
		objs = append(objs, statefulPod(fmt.Sprintf("ns-%d", i%50), fmt.Sprintf("pod-%d", i),
			fmt.Sprintf("wl-%d", i/10), fmt.Sprintf("node-%d", i%benchNodes), a.String()))
	}
	res := realResolver(b, objs...)
	benchIngestWith(b, res, "")
}

// TestIngestHoldsReusedAddress: a pod of node-a is deleted and its address
// given to a new pod the informer does not show yet. A batch of node-a
// with traffic from the address, and one of node-b with traffic to it,
// both stamped after the deletion, are answered 503 with Retry-After and
// not applied (they would go to the deleted pod); sent again once the new
// pod is known, they are credited to the new pod.
func TestIngestHoldsReusedAddress(t *testing.T) {
	client, res, env := webAndDB(t)
	ctx := context.Background()
	ip := netip.MustParseAddr("10.0.1.1")
	if err := client.CoreV1().Pods("shop").Delete(ctx, "web-0", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the deletion seen", func() bool { _, awaiting := res.Lookup(ip, time.Now(), ""); return awaiting })

	from := batch("node-a", 1, rec("10.0.1.1", "10.0.2.1", 5432, 1000, 10))
	to := batch("node-b", 1, rec("10.0.2.1", "10.0.1.1", 8080, 500, 5))
	from.Time, to.Time = time.Now(), time.Now()
	post := func(b *wire.Batch) (int, string) { return env.post(t, "/api/v1/write", b) }
	for name, b := range map[string]*wire.Batch{"from": from, "to": to} {
		if code, retry := post(b); code != http.StatusServiceUnavailable || retry == "" {
			t.Fatalf("batch with traffic %s a released address awaiting its pod: %d, Retry-After %q; want 503 with Retry-After", name, code, retry)
		}
	}
	if got := env.series(); len(got) != 0 {
		t.Fatalf("a held batch was applied: %v", got)
	}
	if v := env.metric("kubezonnet_server_ingest_rejected_total", "reason=awaiting_pod"); v != 2 {
		t.Errorf("rejected awaiting_pod = %v, want 2", v)
	}

	next := statefulPod("shop", "web-1", "web", "node-a", "10.0.1.1")
	if _, err := client.CoreV1().Pods("shop").Create(ctx, next, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the new pod seen", func() bool { return res.Resolve(ip, time.Now()).Pod == "web-1" })
	for _, b := range []*wire.Batch{from, to} {
		if code, _ := post(b); code != http.StatusNoContent {
			t.Fatalf("batch of %s sent again once the new pod is known: %d, want 204", b.Node, code)
		}
	}
	for _, s := range env.series() {
		if strings.Contains(s, `pod="web-0"`) {
			t.Errorf("traffic after the deletion credited to the deleted pod: %s", s)
		}
	}
	if want := `dst_pod="web-1"`; !slices.ContainsFunc(env.series(), func(s string) bool { return strings.Contains(s, want) }) {
		t.Errorf("no series with %s in %v", want, env.series())
	}
	if want := `pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-1"} 1000`; !slices.Contains(env.series(), want) {
		t.Errorf("no %s in %v", want, env.series())
	}
}

// webAndDB starts a server over a real resolver on a fake clientset
// holding web-0 (10.0.1.1) on node-a in zone-a and db-0 (10.0.2.1) on
// node-b in zone-b. The reuse window is far longer than any test: a hold
// ends because the new pod shows up, not because time ran out.
func webAndDB(t *testing.T) (*fake.Clientset, *resolve.Resolver, *testEnv) {
	t.Helper()
	client := fake.NewClientset(node("node-a", "zone-a", "192.168.0.1"), node("node-b", "zone-b", "192.168.0.2"),
		statefulPod("shop", "web-0", "web", "node-a", "10.0.1.1"),
		statefulPod("shop", "db-0", "db", "node-b", "10.0.2.1"))
	res := realResolverOn(t, client, resolve.Config{ReleasedIPTTL: 10 * time.Minute, ReleasedIPCacheSize: 1024, ReuseWindow: 10 * time.Minute})
	return client, res, realEnv(t, res)
}

// post sends b, encoded, to path on the server as an agent does, and
// returns the status code and Retry-After.
func (e *testEnv) post(t *testing.T, path string, b *wire.Batch) (code int, retryAfter string) {
	t.Helper()
	hr, err := http.NewRequest(http.MethodPost, e.url+path, strings.NewReader(string(encode(b))))
	if err != nil {
		t.Fatal(err)
	}
	hr.Header.Set("Content-Type", remotewrite.ContentType)
	hr.Header.Set("Content-Encoding", remotewrite.ContentEncoding)
	resp, err := http.DefaultClient.Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Retry-After")
}

// waitUntil polls cond; the deadline only turns a hang into a failure.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestIngestReportedRelease: node-a's agent reports that the pod holding
// 10.0.1.1 released it, in a batch whose own flows are that pod's. Its
// next batch, with traffic from the address, is held with 503 and
// Retry-After although the informer still shows the released pod (its
// deletion not delivered yet), and once the informer shows the new pod
// the batch is credited to it: each pod gets exactly its own bytes.
func TestIngestReportedRelease(t *testing.T) {
	client, res, env := webAndDB(t)
	ctx := context.Background()
	ip := netip.MustParseAddr("10.0.1.1")

	before := batch("node-a", 1, rec("10.0.1.1", "10.0.2.1", 5432, 1000, 10))
	before.Time = time.Now()
	before.Released = []wire.Release{{Addr: ip, Time: before.Time}}
	after := batch("node-a", 2, rec("10.0.1.1", "10.0.2.1", 5432, 2000, 20))
	after.Time = before.Time.Add(time.Millisecond)
	post := func(b *wire.Batch) (int, string) { return env.post(t, "/api/v1/write", b) }
	if code, _ := post(before); code != http.StatusNoContent {
		t.Fatalf("batch reporting the release: %d, want 204", code)
	}
	if v := env.metric("kubezonnet_server_address_releases_total", "result=recorded"); v != 1 {
		t.Errorf("releases recorded = %v, want 1", v)
	}
	if code, retry := post(after); code != http.StatusServiceUnavailable || retry == "" {
		t.Fatalf("batch after the release, new pod not shown: %d, Retry-After %q; want 503 with Retry-After", code, retry)
	}
	if err := client.CoreV1().Pods("shop").Delete(ctx, "web-0", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().Pods("shop").Create(ctx, statefulPod("shop", "web-1", "web", "node-a", "10.0.1.1"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the new pod seen", func() bool { return res.Resolve(ip, time.Now()).Pod == "web-1" })
	if code, _ := post(after); code != http.StatusNoContent {
		t.Fatalf("batch after the release, sent again once the new pod is known: %d, want 204", code)
	}
	for _, want := range []string{
		`pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-0"} 1000`,
		`pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-1"} 2000`,
	} {
		if !slices.Contains(env.series(), want) {
			t.Errorf("no %s in %v", want, env.series())
		}
	}
	// A report for an address no pod of the node held is ignored.
	other := batch("node-b", 1)
	other.Time = time.Now()
	other.Released = []wire.Release{{Addr: ip, Time: other.Time}}
	if code, _ := post(other); code != http.StatusNoContent {
		t.Fatalf("batch of node-b: %d, want 204", code)
	}
	if v := env.metric("kubezonnet_server_address_releases_total", "result=ignored"); v != 1 {
		t.Errorf("releases ignored = %v, want 1", v)
	}
}

// TestIngestReleaseOfHeldBatch: node-a's batch reporting the release of
// 10.0.1.1 is held (a flow of it goes to an address whose pod is gone and
// whose next pod is not known yet), as any batch may wait. node-b's flow
// to 10.0.1.1 stamped after the release, decoded meanwhile, must not go
// to the released pod: the release counts from the moment its batch is
// decoded, not from when it is applied.
func TestIngestReleaseOfHeldBatch(t *testing.T) {
	client, res, env := webAndDB(t)
	ctx := context.Background()
	if err := client.CoreV1().Pods("shop").Delete(ctx, "db-0", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	db := netip.MustParseAddr("10.0.2.1")
	waitUntil(t, "db-0's deletion seen", func() bool {
		_, awaiting := res.Lookup(db, time.Now(), "node-a")
		return awaiting
	})

	t0 := time.Now().Truncate(time.Millisecond)
	held := batch("node-a", 1, rec("10.0.1.1", "10.0.2.1", 5432, 1000, 10))
	held.Time = t0
	held.Released = []wire.Release{{Addr: netip.MustParseAddr("10.0.1.1"), Time: t0}}
	if code, retry := env.post(t, "/api/v1/write", held); code != http.StatusServiceUnavailable || retry == "" {
		t.Fatalf("node-a's batch to an address awaiting its pod: %d, Retry-After %q; want 503 with Retry-After", code, retry)
	}
	later := batch("node-b", 1, rec("192.168.0.2", "10.0.1.1", 8080, 700, 7))
	later.Time = t0.Add(time.Millisecond)
	if code, _ := env.post(t, "/api/v1/write", later); code != http.StatusServiceUnavailable {
		t.Errorf("node-b's flow to the released address after the release: %d, want 503 (its next pod is not known)", code)
	}
	if got := env.series(); len(got) != 0 {
		t.Errorf("applied while the address awaits its next pod: %v", got)
	}
	if v := env.metric("kubezonnet_server_address_releases_total", "result=recorded"); v != 0 {
		t.Errorf("releases recorded = %v before their batch was applied, want 0 (counted once, when applied)", v)
	}
}

// TestIngestReleaseNotice: node-a sends its release of 10.0.1.1 ahead,
// as a notice naming batch 2, while batch 1 is still to come. The notice
// applies nothing; batches 1 and 2 (stamped up to the notice's time) go
// to the pod that held the address, batch 3 waits for the next pod. A
// notice with flows is refused.
func TestIngestReleaseNotice(t *testing.T) {
	_, _, env := webAndDB(t)
	ip := netip.MustParseAddr("10.0.1.1")
	t0 := time.Now().Truncate(time.Millisecond)
	post := func(path string, b *wire.Batch) int {
		code, _ := env.post(t, path, b)
		return code
	}
	release := []wire.Release{{Addr: ip, Time: t0.Add(2 * time.Millisecond)}}
	b1 := batch("node-a", 1, rec("10.0.1.1", "10.0.2.1", 5432, 1000, 10))
	b1.Time = t0.Add(time.Millisecond)
	b2 := batch("node-a", 2, rec("10.0.1.1", "10.0.2.1", 5432, 300, 3))
	b2.Time, b2.Released = t0.Add(3*time.Millisecond), release
	b3 := batch("node-a", 3, rec("10.0.1.1", "10.0.2.1", 5432, 50, 1))
	b3.Time = t0.Add(4 * time.Millisecond)

	withFlows := &wire.Batch{Node: "node-a", Incarnation: b2.Incarnation, Seq: 2, Time: b2.Time, Released: release, Flows: b2.Flows}
	if code := post(wire.ReleasesPath, withFlows); code != http.StatusBadRequest {
		t.Errorf("notice with flows: %d, want 400", code)
	}
	notice := &wire.Batch{Node: "node-a", Incarnation: b2.Incarnation, Seq: 2, Time: b2.Time, Released: release}
	if code := post(wire.ReleasesPath, notice); code != http.StatusNoContent {
		t.Fatalf("notice: %d, want 204", code)
	}
	if got := env.series(); len(got) != 0 {
		t.Fatalf("a notice applied something: %v", got)
	}
	for _, b := range []*wire.Batch{b1, b2} {
		if code := post("/api/v1/write", b); code != http.StatusNoContent {
			t.Fatalf("batch %d, stamped up to the release's batch: %d, want 204", b.Seq, code)
		}
	}
	if code := post("/api/v1/write", b3); code != http.StatusServiceUnavailable {
		t.Fatalf("batch 3, after the release: %d, want 503", code)
	}
	if want := `pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-0"} 1300`; !slices.Contains(env.series(), want) {
		t.Errorf("no %s in %v", want, env.series())
	}
	for metric, want := range map[string]float64{
		"kubezonnet_server_release_notices_total":                        1,
		`kubezonnet_server_address_releases_total{result="recorded"}`:    2, // the notice, then its batch
		`kubezonnet_server_ingest_rejected_total{reason="awaiting_pod"}`: 1,
		`kubezonnet_server_ingest_rejected_total{reason="malformed"}`:    1,
	} {
		name, labels, _ := strings.Cut(strings.TrimSuffix(metric, "}"), "{")
		if v := env.metric(name, strings.ReplaceAll(labels, `"`, "")); v != want {
			t.Errorf("%s = %v, want %v", metric, v, want)
		}
	}
}

// TestIngestReleaseOrder: node-a's report that web-0 released 10.0.1.1
// and node-b's batch with a flow to 10.0.1.1 stamped after the release
// are in the server at once, node-b's resolved while node-a's report is
// still being read: whether the report entered the handler first, or
// entered while node-b's body was still being read, node-b's batch waits
// for the report (arrivals), and its flow is then held for the address's
// next pod instead of credited to web-0.
func TestIngestReleaseOrder(t *testing.T) {
	for _, tt := range []struct {
		name        string
		reportFirst bool
	}{
		{"report-entered-first", true},
		{"report-entered-while-batch-read", false},
	} {
		t.Run(tt.name, func(t *testing.T) { testIngestReleaseOrder(t, tt.reportFirst) })
	}
}

func testIngestReleaseOrder(t *testing.T, reportFirst bool) {
	_, _, env := webAndDB(t)
	in := env.srv.ingest
	if in.orderWait != releaseOrderWait {
		t.Errorf("a batch waits up to %v for earlier requests, want %v", in.orderWait, releaseOrderWait)
	}
	in.orderWait = time.Minute // the order, not the bound, is under test
	// send posts b, its body written to the handler by hand: the first
	// byte at once, the rest when rest is closed.
	send := func(b *wire.Batch, rest <-chan struct{}, done chan<- int) {
		body := encode(b)
		pr, pw := io.Pipe()
		go func() {
			if _, err := pw.Write(body[:1]); err != nil {
				return
			}
			<-rest
			pw.Write(body[1:])
			pw.Close()
		}()
		hr, err := http.NewRequest(http.MethodPost, env.url+"/api/v1/write", pr)
		if err != nil {
			done <- -1
			return
		}
		hr.ContentLength = int64(len(body))
		hr.Header.Set("Content-Type", remotewrite.ContentType)
		hr.Header.Set("Content-Encoding", remotewrite.ContentEncoding)
		resp, err := http.DefaultClient.Do(hr)
		if err != nil {
			done <- -1
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}

	t0 := time.Now().Truncate(time.Millisecond)
	report := batch("node-a", 1)
	report.Time = t0
	report.Released = []wire.Release{{Addr: netip.MustParseAddr("10.0.1.1"), Time: t0}}
	later := batch("node-b", 1, rec("192.168.0.2", "10.0.1.1", 8080, 700, 7))
	later.Time = t0.Add(time.Millisecond)

	reportRest, laterRest := make(chan struct{}), make(chan struct{})
	// Bodies are finished by the cleanup too: a failure must not leave a
	// request in the server, which would wait for it.
	var reportOnce, laterOnce sync.Once
	finishReport := func() { reportOnce.Do(func() { close(reportRest) }) }
	finishLater := func() { laterOnce.Do(func() { close(laterRest) }) }
	t.Cleanup(finishReport)
	t.Cleanup(finishLater)
	reportDone, laterDone := make(chan int, 1), make(chan int, 1)
	if reportFirst {
		go send(report, reportRest, reportDone)
		waitUntil(t, "the report in the handler, its body not read whole", func() bool { return in.order.open() == 1 })
		go send(later, laterRest, laterDone)
		finishLater()
	} else {
		go send(later, laterRest, laterDone)
		waitUntil(t, "node-b's batch in the handler, its body not read whole", func() bool { return in.order.open() == 1 })
		go send(report, reportRest, reportDone)
		waitUntil(t, "the report in the handler too", func() bool { return in.order.open() == 2 })
		finishLater()
	}
	select {
	case code := <-laterDone:
		t.Fatalf("node-b's batch answered %d while node-a's report was still being read", code)
	case <-time.After(50 * time.Millisecond):
	}
	finishReport()
	if code := <-reportDone; code != http.StatusNoContent {
		t.Fatalf("node-a's report: %d, want 204", code)
	}
	if code := <-laterDone; code != http.StatusServiceUnavailable {
		t.Errorf("node-b's flow to the released address: %d, want 503 (its next pod is not known)", code)
	}
	if got := env.series(); slices.ContainsFunc(got, func(s string) bool { return strings.Contains(s, "700") }) {
		t.Errorf("node-b's flow applied: %v", got)
	}
	if v := env.metric("kubezonnet_server_release_order_timeouts_total", ""); v != 0 {
		t.Errorf("order timeouts = %v, want 0", v)
	}
}
