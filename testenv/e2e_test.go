package testenv

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/deploy"
	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/netns"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// e2e is the end-to-end suite's state: the whole system on one host and
// the independent truth about what its traffic was.
type e2e struct {
	t     *testing.T
	ctx   context.Context
	env   *Env
	stack *Stack
	ref   *testnet.Reference
	// names maps an address to the PromQL matchers (without the src_/dst_
	// prefix) that select its endpoint in a pod-pair series.
	names map[netip.Addr]string
	// nodeNS maps a cluster address to the namespace of the node that
	// sends its traffic, where its reference counters live.
	nodeNS map[netip.Addr]string
	// receivers are the namespaces that received a transfer since the
	// reference was last read (readRef waits for their last ACKs).
	receivers map[string]bool
}

// pollInterval is how often waitFor and poll look at the state they wait
// for.
const pollInterval = 250 * time.Millisecond

// poll evaluates cond every pollInterval until it holds or timeout passes.
// A false cond may say why with its error (a true one's is ignored): poll
// returns the last one at the deadline. Tests wait for what they can observe this way,
// never for a fixed time: a sleep long enough on a loaded CI machine is
// needlessly long everywhere else, and still not always long enough.
func poll(timeout time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = errors.New("condition never held")
			}
			return fmt.Errorf("after %v: %w", timeout, err)
		}
		time.Sleep(pollInterval) // the poll interval, not a wait for the event
	}
}

// waitFor is poll that fails the test, naming what it waited for.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	if err := poll(timeout, cond); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// scrapeOne returns the sum of one metric's samples on a /metrics page,
// or the value of one series given as exposed (name{labels}).
func scrapeOne(ctx context.Context, url, metric string) (float64, error) {
	m, err := ScrapeMetrics(ctx, url)
	if err != nil {
		return 0, err
	}
	v, ok := m[metric]
	if !ok {
		return 0, fmt.Errorf("%s has no %s", url, metric)
	}
	return v, nil
}

// newE2E is the suite's state over a running stack. It records the
// agents' netfilter links in *agentLinks (startNetworkEnv checks at
// cleanup that none is left behind) and fails the test unless each agent
// attached its two hooks.
func newE2E(ctx context.Context, t *testing.T, env *Env, stack *Stack, agentLinks *[]int) *e2e {
	t.Helper()
	for _, a := range stack.Agents {
		*agentLinks = append(*agentLinks, testutil.NetfilterLinks(t, a.Pid())...)
	}
	if len(*agentLinks) != 2*len(stack.Agents) {
		t.Fatalf("%d netfilter links for %d agents, want two each", len(*agentLinks), len(stack.Agents))
	}
	return &e2e{t: t, ctx: ctx, env: env, stack: stack, ref: testnet.NewReference(bpf.DefaultNetfilterPriority + 1),
		names: map[netip.Addr]string{}, nodeNS: map[netip.Addr]string{}, receivers: map[string]bool{}}
}

// slot returns the network namespace pod of workload's pod on node, and
// the pod's name, registering its addresses (see pod).
func (e *e2e) slot(workload, node string) (*testnet.Pod, string) {
	e.t.Helper()
	p := e.env.Cluster.PodOn(workload, node)
	if p == nil {
		e.t.Fatalf("no %s pod on %s", workload, node)
	}
	tp := e.env.Topology.Pod(p.Name)
	e.pod(tp, p.Name)
	return tp, p.Name
}

// pod registers the PromQL matchers of a pod's addresses.
func (e *e2e) pod(p *testnet.Pod, name string) {
	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		e.names[a] = fmt.Sprintf(`_pod=%q`, name)
		e.nodeNS[a] = p.Node.NS
	}
}

// transfer sends n bytes from src to dst over TCP and watches both
// directions (data and ACKs) in the reference, wherever they are counted.
func (e *e2e) transfer(fromNS, toNS string, src, dst netip.Addr, port uint16, n int) {
	e.t.Helper()
	for _, p := range []testnet.Pair{{Src: src, Dst: dst}, {Src: dst, Dst: src}} {
		if ns, ok := e.nodeNS[p.Src]; ok && !e.watched(p) {
			if err := e.ref.Watch(e.ctx, ns, p); err != nil {
				e.t.Fatal(err)
			}
		}
	}
	if err := testnet.Transfer(e.ctx, fromNS, toNS, netip.AddrPortFrom(dst, port), n); err != nil {
		e.t.Fatal(err)
	}
	e.receivers[toNS] = true
}

func (e *e2e) watched(p testnet.Pair) bool {
	return e.ref.Watched(p)
}

// series returns the PromQL selector of the pod-pair series of two
// addresses' endpoints.
func (e *e2e) series(metric string, src, dst netip.Addr) string {
	s, d := e.names[src], e.names[dst]
	return fmt.Sprintf("%s{%s,%s}", metric, strings.ReplaceAll("src"+s, ",", ",src"), strings.ReplaceAll("dst"+d, ",", ",dst"))
}

// value returns the single value of q at t (now when zero); 0 when empty.
func (e *e2e) value(q string, at time.Time) float64 {
	e.t.Helper()
	res, err := e.stack.QueryAt(e.ctx, q, at)
	if err != nil {
		e.t.Fatal(err)
	}
	if len(res) > 1 {
		e.t.Fatalf("%s: %d series, want at most one: %+v", q, len(res), res)
	}
	if len(res) == 0 {
		return 0
	}
	return res[0].Value
}

// expect is one comparison of a PromQL query with the reference.
type expect struct {
	what  string
	query string
	want  float64
}

// settle waits until every expectation holds (the agents flush every
// second, the server pushes every two), or reports the last differences
// after a generous deadline. Waiting is not a timing assertion: what is
// asserted are the values.
func (e *e2e) settle(exps []expect) {
	e.t.Helper()
	err := poll(90*time.Second, func() (bool, error) {
		var bad []string
		for _, x := range exps {
			if got := e.value(x.query, time.Time{}); got != x.want {
				bad = append(bad, fmt.Sprintf("%s: Prometheus %.0f, sent %.0f (%s)", x.what, got, x.want, x.query))
			}
		}
		if len(bad) > 0 {
			return false, errors.New(strings.Join(bad, "\n  "))
		}
		return true, nil
	})
	if err != nil {
		e.t.Fatalf("Prometheus disagrees with what was sent: %v\nserver output:\n%s", err, e.stack.Server.Output())
	}
}

// pairTotals adds up reference counts by the endpoints' series selector,
// as the server aggregates addresses into pods.
func (e *e2e) pairTotals(counts map[testnet.Pair]flow.Counts, keep func(testnet.Pair) bool) map[[2]string]flow.Counts {
	out := map[[2]string]flow.Counts{}
	for p, c := range counts {
		if !keep(p) {
			continue
		}
		k := [2]string{e.names[p.Src], e.names[p.Dst]}
		sum := out[k]
		sum.Add(c)
		out[k] = sum
	}
	return out
}

// readRef reads the reference once the transfers since the last read are
// over on the wire: Transfer returns when the receiver has closed, before
// the sender's last ACK (of the receiver's FIN) is necessarily counted.
// The receiver's socket stays in LAST-ACK until that ACK has crossed both
// nodes, so no LAST-ACK socket left in a receiver's namespace means every
// packet of its transfers went through the reference's counters.
func (e *e2e) readRef() map[testnet.Pair]flow.Counts {
	e.t.Helper()
	for ns := range e.receivers {
		waitFor(e.t, 10*time.Second, "the last ACKs of the transfers to "+ns, func() (bool, error) {
			out, err := testnet.Exec(e.ctx, ns, "ss", "-Htn", "state", "last-ack")
			if err != nil {
				return false, err
			}
			if s := strings.TrimSpace(string(out)); s != "" {
				return false, fmt.Errorf("sockets in LAST-ACK: %s", s)
			}
			return true, nil
		})
	}
	clear(e.receivers)
	c, err := e.ref.Read(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

// testRules is deploy/'s rules file with the cross-zone alert made to fire
// within a test's minutes: its threshold (set in one place, the settings
// group) lowered and its `for` removed. Everything else is as shipped.
func testRules(t *testing.T) string {
	t.Helper()
	root, err := testutil.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "deploy", "rules", "kubezonnet.rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	const threshold = "      - record: kubezonnet:workload_pair_alert_threshold_bytes_per_second\n        expr: vector(1e6)"
	const alert = "      - alert: KubezonnetWorkloadPairCrossZoneTrafficHigh"
	if !strings.Contains(s, threshold) || !strings.Contains(s, alert) {
		t.Fatal("deploy/rules changed: update the end-to-end suite's threshold override")
	}
	// 4 kB/s, between the pairs' rates. rate() counts what a series
	// gains after its first sample, so what a pair sent before its
	// first push does not count, and that depends on where the agent's
	// flushes fall. The heavy pair (db -> api) still gains the 4 MiB of
	// phases 2-4 in the window: measured 7.4 kB/s at the least. The next
	// largest, api -> db (300 kB and the ACKs of db's transfers), was
	// 0.16 kB/s when its transfer came before its first push, and above
	// 2 kB/s (the threshold before, which fired for it in one CI run)
	// when its first push came early: 300 kB in 5 minutes is 1 kB/s,
	// before the ACKs and rate()'s extrapolation to the window's edges.
	s = strings.Replace(s, threshold, strings.Replace(threshold, "vector(1e6)", "vector(4e3)", 1), 1)
	i := strings.Index(s, alert)
	j := i + strings.Index(s[i:], "        for: 15m")
	s = s[:j] + "        for: 0s" + s[j+len("        for: 15m"):]
	path := filepath.Join(t.TempDir(), "rules.yaml")
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// startNetworkEnv starts an environment with a network and builds the
// kubezonnet binary into it. At cleanup it closes the environment and
// checks that nothing is left behind: namespaces (processes: Close kills
// and reaps every one the Env started) and the BPF links the caller adds
// to *links.
func startNetworkEnv(ctx context.Context, t *testing.T, opts EnvOptions) (env *Env, bin string, links *[]int) {
	t.Helper()
	env, err := StartEnv(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	namespaces := env.Topology.Namespaces()
	links = new([]int)
	t.Cleanup(func() {
		if err := env.Close(); err != nil {
			t.Errorf("closing the environment: %v", err)
		}
		for _, ns := range namespaces {
			if _, err := os.Stat(netns.Path(ns)); err == nil {
				t.Errorf("network namespace %s left behind", ns)
			}
		}
		for _, id := range *links {
			if testutil.LinkExists(id) {
				t.Errorf("BPF link %d left behind", id)
			}
		}
	})
	bin, err = testutil.BuildKubezonnet(ctx, env.Dir)
	if err != nil {
		t.Fatal(err)
	}
	return env, bin, links
}

// TestEndToEnd runs the whole system on one host (real API server, eBPF
// agents in six node namespaces, the server, Prometheus) and checks what
// users query against nftables counters of the same traffic.
func TestEndToEnd(t *testing.T) {
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	spec := DefaultSpec()
	spec.StaticHosts = []string{"billing-db"}
	env, bin, agentLinks := startNetworkEnv(ctx, t, EnvOptions{Spec: spec, Network: true})
	billing := env.Topology.Hosts[0]
	stack, err := StartStack(ctx, env, StackOptions{
		Bin:        bin,
		RulesFiles: []string{testRules(t)},
		StaticEndpoints: fmt.Sprintf("endpoints:\n  - name: billing-db\n    zone: zone-c\n    region: %s\n    cidrs: [%s/32, %s/128]\n",
			spec.Region, billing.IPv4, billing.IPv6),
	})
	if err != nil {
		t.Fatal(err)
	}
	e := newE2E(ctx, t, env, stack, agentLinks)
	api, apiName := e.slot("shop/api", "node-a1")
	db, _ := e.slot("shop/db", "node-b1")
	web, _ := e.slot("shop/web", "node-c1")
	cache, _ := e.slot("shop/cache", "node-a2")
	debug, debugName := e.slot("default/debug", "node-b2")
	nodeA1 := env.Topology.Node("node-a1")
	for _, a := range []netip.Addr{nodeA1.IPv4, nodeA1.IPv6} {
		e.names[a] = `_kind="node",_workload="node-a1"`
		e.nodeNS[a] = nodeA1.NS
	}
	for _, a := range []netip.Addr{billing.IPv4, billing.IPv6} {
		e.names[a] = `_kind="static",_workload="billing-db",_zone="zone-c"`
	}
	zoneOf := map[netip.Addr]string{billing.IPv4: "zone-c", billing.IPv6: "zone-c", nodeA1.IPv4: "zone-a", nodeA1.IPv6: "zone-a"}
	for _, p := range []*testnet.Pod{api, db, web, cache, debug} {
		zoneOf[p.IPv4], zoneOf[p.IPv6] = p.Node.Zone, p.Node.Zone
	}

	// Phase 1: every kind of traffic, IPv4 and IPv6.
	e.transfer(db.NS, api.NS, db.IPv4, api.IPv4, 8080, 6<<20)         // heavy cross-zone pair
	e.transfer(api.NS, db.NS, api.IPv4, db.IPv4, 5432, 300_000)       // the client side
	e.transfer(web.NS, api.NS, web.IPv6, api.IPv6, 8443, 500_000)     // IPv6, cross-zone
	e.transfer(api.NS, cache.NS, api.IPv4, cache.IPv4, 6379, 400_000) // same zone
	e.transfer(nodeA1.NS, db.NS, nodeA1.IPv4, db.IPv4, 9100, 100_000) // host network
	e.transfer(debug.NS, billing.NS, debug.IPv4, billing.IPv4, 5432, 200_000)
	ref1 := e.readRef()

	t.Run("pod, workload and zone pairs equal the traffic", func(t *testing.T) {
		cross := func(p testnet.Pair) bool { return zoneOf[p.Src] != zoneOf[p.Dst] }
		var exps []expect
		for k, c := range e.pairTotals(ref1, cross) {
			src, dst := "src"+strings.ReplaceAll(k[0], ",", ",src"), "dst"+strings.ReplaceAll(k[1], ",", ",dst")
			exps = append(exps,
				expect{"bytes " + k[0] + " -> " + k[1], fmt.Sprintf("sum(kubezonnet_pod_pair_bytes_total{%s,%s})", src, dst), float64(c.Bytes)},
				expect{"packets " + k[0] + " -> " + k[1], fmt.Sprintf("sum(kubezonnet_pod_pair_packets_total{%s,%s})", src, dst), float64(c.Packets)})
		}
		// Workload pairs: db -> api adds up its pods.
		var dbAPI flow.Counts
		for p, c := range ref1 {
			if (p.Src == db.IPv4 || p.Src == db.IPv6) && (p.Dst == api.IPv4 || p.Dst == api.IPv6) {
				dbAPI.Add(c)
			}
		}
		exps = append(exps, expect{"workload pair db -> api",
			`sum(kubezonnet_pod_pair_bytes_total{src_workload="db",dst_workload="api"})`, float64(dbAPI.Bytes)})
		// Zone pairs, same-zone included.
		zones := map[[2]string]float64{}
		for p, c := range ref1 {
			zones[[2]string{zoneOf[p.Src], zoneOf[p.Dst]}] += float64(c.Bytes)
		}
		for z, b := range zones {
			exps = append(exps, expect{"zone pair " + z[0] + " -> " + z[1],
				fmt.Sprintf(`sum(kubezonnet_zone_pair_bytes_total{src_zone=%q,dst_zone=%q})`, z[0], z[1]), b})
		}
		sort.Slice(exps, func(i, j int) bool { return exps[i].what < exps[j].what })
		e.settle(exps)
	})

	t.Run("same-zone pairs only in zone pairs; host network and static endpoints labelled", func(t *testing.T) {
		if got := e.value(fmt.Sprintf(`count(%s)`, e.series("kubezonnet_pod_pair_bytes_total", api.IPv4, cache.IPv4)), time.Time{}); got != 0 {
			t.Errorf("same-zone pod pair api -> cache has %v series; it belongs only in zone pairs without --all-pairs", got)
		}
		for _, x := range []struct{ what, q string }{
			{"host network source", `kubezonnet_pod_pair_bytes_total{src_kind="node",src_workload="node-a1",src_workload_kind="Node",src_zone="zone-a",dst_workload="db",class="cross-zone"}`},
			{"static destination", `kubezonnet_pod_pair_bytes_total{src_workload="debug",dst_kind="static",dst_workload="billing-db",dst_workload_kind="Static",dst_zone="zone-c",class="cross-zone"}`},
			{"workload kinds", `kubezonnet_pod_pair_bytes_total{src_workload="db",src_workload_kind="StatefulSet",dst_workload="api",dst_workload_kind="Deployment",src_namespace="shop"}`},
			{"compatibility series", fmt.Sprintf(`pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod=%q}`, apiName)},
		} {
			if got := e.value(fmt.Sprintf("count(%s)", x.q), time.Time{}); got != 1 {
				t.Errorf("%s: %v series of %s, want 1", x.what, got, x.q)
			}
		}
	})

	// Avoidable crossings for the Service rows of the dashboard: api
	// (zone a) calls catalog-legacy, which kube-proxy sends to either
	// catalog pod, until a connection crosses to zone b. Far below the
	// cross-zone alert's threshold, and after the zone-pair check above,
	// which counts only the reference's pairs.
	catA, catB := env.Topology.Pod(env.Cluster.PodOn("shop/catalog", "node-a2").Name), env.Topology.Pod(env.Cluster.PodOn("shop/catalog", "node-b2").Name)
	legacy := env.Cluster.ServiceVIPs("shop/catalog-legacy")
	catalogEPs := map[netip.AddrPort]string{netip.AddrPortFrom(catA.IPv4, 8080): catA.NS, netip.AddrPortFrom(catB.IPv4, 8080): catB.NS}
	for crossed := false; !crossed; {
		got, err := testnet.TransferToService(ctx, "tcp", api.NS, netip.AddrPortFrom(legacy[0], 80), catalogEPs, 2000)
		if err != nil {
			t.Fatal(err)
		}
		crossed = got.Addr() == catB.IPv4
	}

	// Phase 2: the api pod is deleted and a new one gets its addresses.
	// Its sandbox goes first (the veth and the node's routes to it), as
	// when a kubelet tears a pod down, then the API object, and the new
	// pod's sandbox gets the same addresses: the agent of api's node
	// reports the release, and the server records it.
	const releases = `kubezonnet_server_address_releases_total{result="recorded"}`
	releases0, err := scrapeOne(ctx, stack.ServerURL+"/metrics", releases)
	if err != nil {
		t.Fatal(err)
	}
	old := e.series("kubezonnet_pod_pair_bytes_total", db.IPv4, api.IPv4)
	oldValue := e.value(old, time.Time{})
	if err := env.Topology.RecreatePod(ctx, api); err != nil {
		t.Fatal(err)
	}
	_, replacement, err := env.Cluster.ReplacePod(ctx, apiName, "shop/api")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "the server to record the releases of api's addresses", func() (bool, error) {
		v, err := scrapeOne(ctx, stack.ServerURL+"/metrics", releases)
		return err == nil && v >= releases0+2, fmt.Errorf("%s went from %v to %v (%v)", releases, releases0, v, err)
	})
	e.pod(api, replacement.Name)
	// The server's informer must know the new pod before db sends to its
	// addresses. The server exposes no count of the pods it knows, so
	// probe through the attribution itself: small transfers from debug
	// (a pair no later check looks at, far below the alert's threshold)
	// until Prometheus shows one attributed to the new pod. The probe's
	// bytes would go to the old pod (or nowhere) while the informer lags;
	// they never touch db -> api, whose series are checked below.
	probe := fmt.Sprintf(`count(kubezonnet_pod_pair_bytes_total{src_pod=%q,dst_pod=%q})`, debugName, replacement.Name)
	waitFor(t, time.Minute, "the server to attribute traffic to the new api pod", func() (bool, error) {
		if err := testnet.Transfer(ctx, debug.NS, api.NS, netip.AddrPortFrom(api.IPv4, 7000), 1000); err != nil {
			return false, err
		}
		res, err := stack.Query(ctx, probe)
		return err == nil && len(res) == 1 && res[0].Value == 1, err
	})
	e.transfer(db.NS, api.NS, db.IPv4, api.IPv4, 8080, 2<<20)
	ref2 := e.readRef()
	moved := ref2[testnet.Pair{Src: db.IPv4, Dst: api.IPv4}].Bytes - ref1[testnet.Pair{Src: db.IPv4, Dst: api.IPv4}].Bytes

	t.Run("a reused IP attributes bytes to the right pod on each side", func(t *testing.T) {
		e.settle([]expect{
			{"new api pod", e.series("kubezonnet_pod_pair_bytes_total", db.IPv4, api.IPv4), float64(moved)},
			{"old api pod", old, oldValue},
		})
		if oldValue != float64(ref1[testnet.Pair{Src: db.IPv4, Dst: api.IPv4}].Bytes) {
			t.Errorf("old pod: %v bytes before the change, sent %d", oldValue, ref1[testnet.Pair{Src: db.IPv4, Dst: api.IPv4}].Bytes)
		}
	})

	// Phase 3: the remote-write endpoint goes away, then the server
	// restarts, while traffic flows.
	const overruns = "kubezonnet_server_remote_write_push_overruns_total"
	overruns0, err := scrapeOne(ctx, stack.ServerURL+"/metrics", overruns)
	if err != nil {
		t.Fatal(err)
	}
	stack.Prometheus.Kill()
	e.transfer(db.NS, api.NS, db.IPv4, api.IPv4, 8080, 1<<20)
	// The endpoint stays down for ~30 failed pushes (a minute at the
	// stack's 2 s interval): every push while the shards retry the previous
	// one is an overrun, its snapshot replacing the unsent one.
	waitFor(t, 3*time.Minute, "30 pushes into the outage", func() (bool, error) {
		v, err := scrapeOne(ctx, stack.ServerURL+"/metrics", overruns)
		if err != nil {
			return false, err
		}
		return v >= overruns0+30, fmt.Errorf("%s went from %v to %v", overruns, overruns0, v)
	})
	if err := stack.StartPrometheus(); err != nil {
		t.Fatal(err)
	}
	if err := waitHTTP(ctx, stack.PrometheusURL+"/-/ready", stack.Prometheus); err != nil {
		t.Fatal(err)
	}
	// The pusher delivers the outage's counts before the restart.
	refOutage := e.readRef()
	e.settle([]expect{{"the outage's bytes", e.series("kubezonnet_pod_pair_bytes_total", db.IPv4, api.IPv4),
		float64(refOutage[testnet.Pair{Src: db.IPv4, Dst: api.IPv4}].Bytes - ref1[testnet.Pair{Src: db.IPv4, Dst: api.IPv4}].Bytes)}})
	if err := stack.Server.Stop(15 * time.Second); err != nil {
		t.Fatalf("server did not stop cleanly: %v", err)
	}
	stopped := time.Now()
	e.transfer(db.NS, api.NS, db.IPv4, api.IPv4, 8080, 1<<20) // agents buffer and retry
	if err := stack.StartServer(ctx); err != nil {
		t.Fatal(err)
	}
	ref3 := e.readRef()

	t.Run("no byte lost to a remote-write outage or a server restart", func(t *testing.T) {
		want := ref3[testnet.Pair{Src: db.IPv4, Dst: api.IPv4}].Bytes - ref1[testnet.Pair{Src: db.IPv4, Dst: api.IPv4}].Bytes
		newPair := e.series("kubezonnet_pod_pair_bytes_total", db.IPv4, api.IPv4)
		before := e.value(newPair, stopped)
		if before < float64(moved) {
			t.Fatalf("before the restart Prometheus had %v bytes, at least %d were sent", before, moved)
		}
		// The restarted server counts from zero: what users see with
		// increase() is the last value before the reset plus the new one.
		e.settle([]expect{{"after the restart", newPair, float64(want) - before}})
	})

	t.Run("every dashboard query returns data", func(t *testing.T) {
		queries, _, err := deploy.DashboardQueries()
		if err != nil {
			t.Fatal(err)
		}
		labelValues := regexp.MustCompile(`^label_values\((.*),\s*\w+\)$`)
		for _, q := range queries {
			expr := deploy.ExpandGrafanaVariables(q.Expr)
			if m := labelValues.FindStringSubmatch(expr); m != nil {
				expr = m[1] // Grafana's label_values(selector, label)
			}
			res, err := stack.Query(ctx, expr)
			if err != nil {
				t.Errorf("panel %q: %v", q.Panel, err)
				continue
			}
			if len(res) == 0 {
				t.Errorf("panel %q returns no data: %s", q.Panel, expr)
			}
		}
	})

	t.Run("the cross-zone alert fires for the heavy workload pair only", func(t *testing.T) {
		var res []Sample
		err := poll(60*time.Second, func() (bool, error) {
			var err error
			res, err = stack.Query(ctx, `ALERTS{alertname="KubezonnetWorkloadPairCrossZoneTrafficHigh",alertstate="firing"}`)
			return len(res) > 0, err
		})
		if err != nil {
			var dump strings.Builder
			for _, q := range []string{`kubezonnet:workload_pair_bytes:rate5m`, `kubezonnet:workload_pair_alert_threshold_bytes_per_second`, `ALERTS`} {
				res, err := stack.Query(ctx, q)
				fmt.Fprintf(&dump, "%s: %v %+v\n", q, err, res)
			}
			rules, _ := HTTPGet(ctx, stack.PrometheusURL+"/api/v1/rules")
			t.Fatalf("the cross-zone alert never fired for db -> api: %v\n%s\nrules: %.3000s", err, dump.String(), rules)
		}
		for _, r := range res {
			if r.Labels["src_workload"] != "db" || r.Labels["dst_workload"] != "api" {
				rates, err := stack.Query(ctx, `kubezonnet:workload_pair_bytes:rate5m{class=~"cross-zone|cross-region"}`)
				t.Errorf("alert fired for %s -> %s; cross-zone rates (B/s): %v %+v", r.Labels["src_workload"], r.Labels["dst_workload"], err, rates)
			}
		}
		if len(res) != 1 {
			t.Errorf("%d firing alerts, want 1 (db -> api)", len(res))
		}
	})
}

// TestEndToEndOffloads runs bulk transfers with TSO/GSO/GRO on, as real
// nodes do: one skb then carries many segments, and what Prometheus shows
// must still be what the wire carries. Packets: exactly the segments the
// sending pod's stack sent (TcpOutSegs plus TcpRetransSegs). Bytes: the
// payload plus one IP and TCP header (with timestamps) per segment and the
// SYN's options, exactly, plus at most one MSS per retransmission. Both
// less what the pod's link dropped before the node, if it did.
func TestEndToEndOffloads(t *testing.T) {
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	spec := DefaultSpec()
	spec.Offloads = true
	env, err := StartEnv(ctx, EnvOptions{Spec: spec, Network: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := env.Close(); err != nil {
			t.Errorf("closing the environment: %v", err)
		}
	})
	bin, err := testutil.BuildKubezonnet(ctx, env.Dir)
	if err != nil {
		t.Fatal(err)
	}
	stack, err := StartStack(ctx, env, StackOptions{Bin: bin})
	if err != nil {
		t.Fatal(err)
	}
	pod := func(workload, node string) (*testnet.Pod, string) {
		p := env.Cluster.PodOn(workload, node)
		if p == nil {
			t.Fatalf("no %s pod on %s", workload, node)
		}
		return env.Topology.Pod(p.Name), p.Name
	}
	api, apiName := pod("shop/api", "node-a1")
	db, dbName := pod("shop/db", "node-b1")
	web, webName := pod("shop/web", "node-c1")
	for _, tc := range []struct {
		name       string
		from, to   *testnet.Pod
		src, dst   netip.Addr
		srcN, dstN string
		payload    int
		mss, hdr   int // MSS and IP+TCP header (timestamps on) of the family
	}{
		{"IPv4", db, api, db.IPv4, api.IPv4, dbName, apiName, 20 << 20, 1448, 20 + 32},
		{"IPv6", web, api, web.IPv6, api.IPv6, webName, apiName, 10 << 20, 1428, 40 + 32},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// sent reads the pod's count of segments sent, of them
			// retransmitted, and of skbs its link dropped before the node.
			sent := func() (segs, retrans, dropped uint64) {
				v, err := testnet.NetStat(ctx, tc.from.NS, "TcpOutSegs", "TcpRetransSegs")
				if err != nil {
					t.Fatal(err)
				}
				if dropped, err = testnet.TxDropped(ctx, tc.from.NS, "eth0"); err != nil {
					t.Fatal(err)
				}
				return v["TcpOutSegs"] + v["TcpRetransSegs"], v["TcpRetransSegs"], dropped
			}
			segs0, retrans0, dropped0 := sent()
			if err := testnet.TransferChunked(ctx, tc.from.NS, tc.to.NS, netip.AddrPortFrom(tc.dst, 9000), tc.payload, 45*tc.mss); err != nil {
				t.Fatal(err)
			}
			segs1, retrans1, dropped1 := sent()
			// Every segment the stack sent, however TSO packed them, and
			// retransmissions (real wire bytes, which OutSegs leaves out).
			segs, retrans, dropped := segs1-segs0, retrans1-retrans0, dropped1-dropped0
			// Each segment's headers; the SYN has 8 bytes of options over
			// the timestamps (MSS, SACK, window scale); a retransmission
			// carries at most one MSS of payload again.
			minBytes := float64(uint64(tc.payload) + segs*uint64(tc.hdr) + 8)
			maxBytes := minBytes + float64(retrans*uint64(tc.mss))
			minPackets, maxPackets := float64(segs), float64(segs)
			if dropped > 0 {
				// Segments the stack sent that never reached the node:
				// one skb of at most 64 KiB of payload each.
				maxSegs := uint64(65536/tc.mss + 1)
				minPackets -= float64(dropped * maxSegs)
				maxPackets -= float64(dropped)
				minBytes -= float64(dropped * maxSegs * uint64(tc.mss+tc.hdr))
				maxBytes -= float64(dropped * uint64(tc.hdr))
				t.Logf("%s: the pod's link dropped %d skbs before the node", tc.name, dropped)
			}
			q := func(m string) string {
				return fmt.Sprintf(`sum(%s{src_pod=%q,dst_pod=%q})`, m, tc.srcN, tc.dstN)
			}
			// The last flush and push: the sender's agent has had a batch
			// acknowledged that it began draining after the transfer (the
			// second one from now: the first may have begun before), and
			// then Prometheus has a sample of each series stamped later
			// (the server stamps a push's samples when it takes its
			// snapshot), so the sample holds everything counted.
			agentMetrics := stack.AgentURL(tc.from.Node.Name) + "/metrics"
			const batches = "kubezonnet_agent_batches_sent_total"
			sent0, err := scrapeOne(ctx, agentMetrics, batches)
			if err != nil {
				t.Fatal(err)
			}
			waitFor(t, time.Minute, "two batches from "+tc.from.Node.Name+"'s agent", func() (bool, error) {
				v, err := scrapeOne(ctx, agentMetrics, batches)
				return v >= sent0+2, err
			})
			flushed := time.Now()
			for _, m := range []string{"kubezonnet_pod_pair_bytes_total", "kubezonnet_pod_pair_packets_total"} {
				stamp := fmt.Sprintf(`min(timestamp(%s{src_pod=%q,dst_pod=%q}))`, m, tc.srcN, tc.dstN)
				waitFor(t, time.Minute, "a push of "+m+" after the last flush", func() (bool, error) {
					res, err := stack.Query(ctx, stamp)
					if err != nil || len(res) != 1 {
						return false, fmt.Errorf("%s: %v %+v", stamp, err, res)
					}
					return res[0].Value > float64(flushed.UnixMilli())/1000, nil
				})
			}
			for _, c := range []struct {
				metric   string
				min, max float64
			}{
				{"kubezonnet_pod_pair_bytes_total", minBytes, maxBytes},
				{"kubezonnet_pod_pair_packets_total", minPackets, maxPackets},
			} {
				res, err := stack.Query(ctx, q(c.metric))
				if err != nil || len(res) != 1 {
					t.Fatalf("%s: %v %+v", c.metric, err, res)
				}
				got := res[0].Value
				t.Logf("%s %s: %.0f; the sender's stack: %.0f to %.0f (%d segments, %d of them retransmitted)", tc.name, c.metric, got, c.min, c.max, segs, retrans)
				if got < c.min || got > c.max {
					t.Errorf("%s %s: %.0f, want %.0f to %.0f", tc.name, c.metric, got, c.min, c.max)
				}
			}
		})
	}
}
