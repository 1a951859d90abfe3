package resolve

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// check is one lookup: address ip observed at base+at must give want, and
// Owner must name want's node (or report no owner when it has none).
type check struct {
	ip   string
	at   time.Duration
	want *Endpoint
}

// step changes the cluster at base+at (act may be nil), then runs checks.
type step struct {
	at     time.Duration
	act    func(f *fixture, at time.Time)
	checks []check
}

const ttl = 2 * time.Minute

// Nodes shared by the cases.
func nodeA() *corev1.Node { return node("n-a", "z-a", "r-1", "10.0.0.1", "fd00::1") }
func nodeB() *corev1.Node { return node("n-b", "z-b", "r-1", "10.0.0.2") }
func nodeD() *corev1.Node { return node("n-d", "z-d", "r-2", "10.0.0.4") }

func TestResolve(t *testing.T) {
	webEP := podEP("shop", "web-7d9f-x1", "web", "Deployment", "n-a", "z-a", "r-1")
	dbEP := podEP("shop", "db-0", "db", "StatefulSet", "n-a", "z-a", "r-1")
	cacheEP := podEP("shop", "cache-q2", "cache", "DaemonSet", "n-b", "z-b", "r-1")
	oldEP := podEP("shop", "old", "old", "Pod", "n-a", "z-a", "r-1")
	newEP := podEP("shop", "new", "new", "Pod", "n-b", "z-b", "r-1")
	apiEP := podEP("shop", "api-0", "api", "StatefulSet", "n-d", "z-d", "r-2")
	noPod := unknownEP("no_pod")

	cases := []struct {
		name  string
		opts  fixtureOpts
		steps []step
	}{
		{
			name: "pod churn: a deleted pod's late flows resolve to it within the TTL",
			opts: fixtureOpts{
				objs: []runtime.Object{nodeA(), nodeB(),
					pod("shop", "web-7d9f-x1", "n-a", []string{"10.1.0.5"}, ownedBy("ReplicaSet", "web-7d9f"), labels("pod-template-hash", "7d9f"))},
				owners: []runtime.Object{ownerMeta("ReplicaSet", "shop", "web-7d9f", "Deployment", "web")},
			},
			steps: []step{
				{checks: []check{{"10.1.0.5", -time.Hour, webEP}, {"10.1.0.5", 0, webEP}}},
				{at: 10 * time.Second, act: func(f *fixture, at time.Time) { f.deletePod(at, "shop", "web-7d9f-x1") }, checks: []check{
					{"10.1.0.5", 5 * time.Second, webEP},
					{"10.1.0.5", 10*time.Second + ttl - time.Second, webEP}, // drained late, within the TTL
					{"10.1.0.5", 10*time.Second + ttl + time.Second, noPod},
				}},
				{at: 20 * time.Second, act: func(f *fixture, at time.Time) {
					f.createPod(at, pod("shop", "web-7d9f-x2", "n-b", []string{"10.1.0.6"}, ownedBy("ReplicaSet", "web-7d9f"), labels("pod-template-hash", "7d9f")))
				}, checks: []check{
					{"10.1.0.6", 21 * time.Second, podEP("shop", "web-7d9f-x2", "web", "Deployment", "n-b", "z-b", "r-1")},
					{"10.1.0.5", 21 * time.Second, webEP},
				}},
			},
		},
		{
			name: "IP reuse within the LRU window: old flows to the old pod, new flows to the new",
			opts: fixtureOpts{objs: []runtime.Object{nodeA(), nodeB(),
				pod("shop", "db-0", "n-a", []string{"10.1.0.9"}, ownedBy("StatefulSet", "db"))}},
			steps: []step{
				{at: 60 * time.Second, act: func(f *fixture, at time.Time) { f.deletePod(at, "shop", "db-0") }},
				{at: 90 * time.Second, act: func(f *fixture, at time.Time) {
					f.createPod(at, pod("shop", "cache-q2", "n-b", []string{"10.1.0.9"}, ownedBy("DaemonSet", "cache")))
				}, checks: []check{
					{"10.1.0.9", 30 * time.Second, dbEP},
					{"10.1.0.9", 70 * time.Second, dbEP}, // after the delete, before the reuse
					{"10.1.0.9", 90 * time.Second, cacheEP},
					{"10.1.0.9", 91 * time.Second, cacheEP},
				}},
				{at: 100 * time.Second, act: func(f *fixture, at time.Time) { f.deletePod(at, "shop", "cache-q2") }, checks: []check{
					{"10.1.0.9", 30 * time.Second, dbEP},
					{"10.1.0.9", 95 * time.Second, cacheEP},
					{"10.1.0.9", 100*time.Second + ttl - time.Second, cacheEP},
				}},
			},
		},
		{
			name: "IP reuse seen before the old pod's deletion",
			opts: fixtureOpts{objs: []runtime.Object{nodeA(), nodeB(),
				pod("shop", "old", "n-a", []string{"10.1.0.10"})}},
			steps: []step{
				{at: 60 * time.Second, act: func(f *fixture, at time.Time) {
					f.createPod(at, pod("shop", "new", "n-b", []string{"10.1.0.10"}))
				}, checks: []check{
					{"10.1.0.10", 59 * time.Second, oldEP},
					{"10.1.0.10", 61 * time.Second, newEP},
				}},
				// Deleting the old pod must not take the address from the new.
				{at: 70 * time.Second, act: func(f *fixture, at time.Time) { f.deletePod(at, "shop", "old") }, checks: []check{
					{"10.1.0.10", 59 * time.Second, oldEP},
					{"10.1.0.10", 71 * time.Second, newEP},
				}},
			},
		},
		{
			name: "the released-IP LRU is bounded: the oldest release is forgotten first",
			opts: fixtureOpts{cfg: Config{ReleasedIPCacheSize: 1}, objs: []runtime.Object{nodeA(), nodeB(),
				pod("shop", "db-0", "n-a", []string{"10.1.0.20"}, ownedBy("StatefulSet", "db")),
				pod("shop", "cache-q2", "n-b", []string{"10.1.0.21"}, ownedBy("DaemonSet", "cache"))}},
			steps: []step{
				{at: 10 * time.Second, act: func(f *fixture, at time.Time) { f.deletePod(at, "shop", "db-0") }, checks: []check{
					{"10.1.0.20", 5 * time.Second, dbEP},
				}},
				{at: 20 * time.Second, act: func(f *fixture, at time.Time) { f.deletePod(at, "shop", "cache-q2") }, checks: []check{
					{"10.1.0.20", 5 * time.Second, noPod},
					{"10.1.0.21", 15 * time.Second, cacheEP},
				}},
			},
		},
		{
			name: "pod in a terminal phase gives its address back",
			opts: fixtureOpts{objs: []runtime.Object{nodeA(),
				pod("shop", "old", "n-a", []string{"10.1.0.11"})}},
			steps: []step{
				{at: 10 * time.Second, act: func(f *fixture, at time.Time) {
					f.updatePod(at, pod("shop", "old", "n-a", []string{"10.1.0.11"}, phase(corev1.PodSucceeded)))
				}, checks: []check{
					{"10.1.0.11", 5 * time.Second, oldEP},
					{"10.1.0.11", 10*time.Second + ttl + time.Second, noPod},
				}},
			},
		},
		{
			name: "pod recreated under the same name with a new UID and address",
			opts: fixtureOpts{objs: []runtime.Object{nodeA(), nodeB(),
				pod("shop", "old", "n-a", []string{"10.1.0.12"})}},
			steps: []step{
				{at: 10 * time.Second, act: func(f *fixture, at time.Time) {
					f.updatePod(at, pod("shop", "old", "n-b", []string{"10.1.0.13"}, uid("second")))
				}, checks: []check{
					{"10.1.0.12", 5 * time.Second, oldEP},
					{"10.1.0.13", 11 * time.Second, podEP("shop", "old", "old", "Pod", "n-b", "z-b", "r-1")},
				}},
			},
		},
		{
			name: "host-network pods and node addresses resolve to the node",
			opts: fixtureOpts{objs: []runtime.Object{nodeA(), nodeB(),
				pod("kube-system", "kube-proxy-abc", "n-a", []string{"10.0.0.1", "fd00::1"}, ownedBy("DaemonSet", "kube-proxy"), hostNetwork),
				pod("kube-system", "agent", "n-b", []string{"10.0.5.5"}, hostNetwork)}},
			steps: []step{
				{checks: []check{
					{"10.0.0.1", 0, nodeEP("n-a", "z-a", "r-1")},
					{"fd00::1", 0, nodeEP("n-a", "z-a", "r-1")},
					{"10.0.0.2", 0, nodeEP("n-b", "z-b", "r-1")},
					{"10.0.5.5", 0, nodeEP("n-b", "z-b", "r-1")}, // not a node address, but a host-network pod's
				}},
				{at: 10 * time.Second, act: func(f *fixture, at time.Time) { f.deletePod(at, "kube-system", "agent") }, checks: []check{
					{"10.0.5.5", 11 * time.Second, noPod},
					{"10.0.0.2", 11 * time.Second, nodeEP("n-b", "z-b", "r-1")},
				}},
				{at: 20 * time.Second, act: func(f *fixture, at time.Time) { f.deletePod(at, "kube-system", "kube-proxy-abc") }, checks: []check{
					{"10.0.0.1", 21 * time.Second, nodeEP("n-a", "z-a", "r-1")},
				}},
			},
		},
		{
			name: "dual-stack pod: both families and the IPv4-mapped form",
			opts: fixtureOpts{objs: []runtime.Object{nodeD(),
				pod("shop", "api-0", "n-d", []string{"10.1.2.3", "fd00:1::3"}, ownedBy("StatefulSet", "api"))}},
			steps: []step{
				{checks: []check{
					{"10.1.2.3", 0, apiEP},
					{"fd00:1::3", 0, apiEP},
					{"::ffff:10.1.2.3", 0, apiEP},
					{"fd00:1::3%eth0", 0, apiEP},
				}},
				{at: 10 * time.Second, act: func(f *fixture, at time.Time) { f.deletePod(at, "shop", "api-0") }, checks: []check{
					{"fd00:1::3", 5 * time.Second, apiEP},
					{"10.1.2.3", 5 * time.Second, apiEP},
					{"fd00:1::3", 10*time.Second + ttl + time.Second, noPod},
				}},
			},
		},
		{
			name: "a node without a zone label gets one later",
			opts: fixtureOpts{objs: []runtime.Object{node("n-c", "", "", "10.0.0.3"),
				pod("shop", "w-0", "n-c", []string{"10.1.3.3"})}},
			steps: []step{
				{checks: []check{
					{"10.1.3.3", 0, unknownPodEP("no_zone", "shop", "w-0", "n-c")},
					{"10.0.0.3", 0, unknownNodeEP("no_zone", "n-c")},
				}},
				{at: 10 * time.Second, act: func(f *fixture, at time.Time) { f.updateNode(at, node("n-c", "z-c", "r-1", "10.0.0.3")) }, checks: []check{
					{"10.1.3.3", 11 * time.Second, podEP("shop", "w-0", "w-0", "Pod", "n-c", "z-c", "r-1")},
					{"10.1.3.3", 0, podEP("shop", "w-0", "w-0", "Pod", "n-c", "z-c", "r-1")},
					{"10.0.0.3", 11 * time.Second, nodeEP("n-c", "z-c", "r-1")},
				}},
			},
		},
		{
			name: "a pod on a node the informer has not delivered yet",
			opts: fixtureOpts{objs: []runtime.Object{pod("shop", "w-1", "n-e", []string{"10.1.4.4"})}},
			steps: []step{
				{checks: []check{{"10.1.4.4", 0, unknownPodEP("no_node", "shop", "w-1", "n-e")}}},
				{at: 10 * time.Second, act: func(f *fixture, at time.Time) { f.createNode(at, node("n-e", "z-e", "", "10.0.0.5")) }, checks: []check{
					{"10.1.4.4", 11 * time.Second, podEP("shop", "w-1", "w-1", "Pod", "n-e", "z-e", "")},
					{"10.0.0.5", 11 * time.Second, nodeEP("n-e", "z-e", "")},
				}},
			},
		},
		{
			name: "static endpoints: longest prefix wins, pods win over static ranges",
			opts: fixtureOpts{
				cfg:  Config{StaticEndpointsFile: writeFile(t, "static.yaml", staticFile)},
				objs: []runtime.Object{nodeA(), pod("shop", "old", "n-a", []string{"10.50.7.7"})},
			},
			steps: []step{{checks: []check{
				{"10.50.1.1", 0, staticEP("orders-db", "z-a", "r-1")},
				{"10.50.7.9", 0, staticEP("orders-db-replica", "z-b", "")},
				{"192.0.2.10", 0, staticEP("onprem", "dc-1", "onprem")},
				{"2001:db8:100::5", 0, staticEP("onprem", "dc-1", "onprem")},
				{"203.0.113.7", 0, staticEP("nat", "z-a", "r-1")},
				{"10.50.7.7", 0, oldEP},
				{"10.51.0.1", 0, noPod},
			}}},
		},
		{
			name: "external and unknown addresses",
			opts: fixtureOpts{objs: []runtime.Object{nodeA()}},
			steps: []step{{checks: []check{
				{"8.8.8.8", 0, externalEP},
				{"2606:4700::1111", 0, externalEP},
				{"::ffff:1.1.1.1", 0, externalEP},
				{"10.99.0.1", 0, noPod},
				{"192.168.1.1", 0, noPod},
				{"172.16.0.1", 0, noPod},
				{"100.64.0.7", 0, noPod},
				{"169.254.169.254", 0, noPod},
				{"fe80::1", 0, noPod},
				{"fd12::1", 0, noPod},
				{"127.0.0.1", 0, noPod},
				{"0.0.0.0", 0, unknownEP("invalid_address")},
				{"::", 0, unknownEP("invalid_address")},
				{"", 0, unknownEP("invalid_address")},
			}}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, tc.opts)
			for i, s := range tc.steps {
				if s.act != nil {
					s.act(f, base.Add(s.at))
				}
				for _, c := range s.checks {
					assertResolve(t, f.r, i, c)
				}
			}
		})
	}
}

// assertResolve checks Resolve and Owner for one lookup.
func assertResolve(t *testing.T, r *Resolver, stepNo int, c check) {
	t.Helper()
	var ip netip.Addr
	if c.ip != "" {
		ip = netip.MustParseAddr(c.ip)
	}
	at := base.Add(c.at)
	got := r.Resolve(ip, at)
	if got == nil || !reflect.DeepEqual(*got, *c.want) {
		t.Errorf("step %d: Resolve(%s, base%+v) =\n  %+v\nwant\n  %+v", stepNo, c.ip, c.at, deref(got), *c.want)
	}
	node, _, ok := r.Owner(ip, at)
	if node != c.want.Node || ok != (c.want.Node != "") {
		t.Errorf("step %d: Owner(%s, base%+v) = %q, %v; want %q", stepNo, c.ip, c.at, node, ok, c.want.Node)
	}
}

func deref(ep *Endpoint) any {
	if ep == nil {
		return nil
	}
	return *ep
}

const staticFile = `# test ranges
endpoints:
  - name: orders-db
    zone: z-a
    region: r-1
    cidrs: [10.50.0.0/16]
  - name: orders-db-replica
    zone: z-b
    cidrs:
      - 10.50.7.0/24
  - name: onprem
    zone: dc-1
    region: onprem
    cidrs: ["2001:db8:100::/48", 192.0.2.10]
  - name: nat
    zone: z-a
    region: r-1
    cidrs: [203.0.113.0/24]
`

func TestWorkloads(t *testing.T) {
	owners := []runtime.Object{
		ownerMeta("ReplicaSet", "shop", "web-7d9f", "Deployment", "web"),
		ownerMeta("ReplicaSet", "shop", "orphan-rs", "", ""),
		ownerMeta("Job", "shop", "nightly-28000000", "CronJob", "nightly"),
		ownerMeta("Job", "shop", "once", "", ""),
	}
	pods := []runtime.Object{nodeA(),
		pod("shop", "web-7d9f-x1", "n-a", []string{"10.2.0.1"}, ownedBy("ReplicaSet", "web-7d9f"), labels("pod-template-hash", "7d9f", "app", "web")),
		pod("shop", "orphan-rs-x1", "n-a", []string{"10.2.0.2"}, ownedBy("ReplicaSet", "orphan-rs")),
		pod("shop", "nightly-28000000-x", "n-a", []string{"10.2.0.3"}, ownedBy("Job", "nightly-28000000")),
		pod("shop", "once-x", "n-a", []string{"10.2.0.4"}, ownedBy("Job", "once")),
		pod("shop", "s-0", "n-a", []string{"10.2.0.5"}, ownedBy("StatefulSet", "s")),
		pod("kube-system", "etcd-n-a", "n-a", []string{"10.2.0.6"}, ownedBy("Node", "n-a")),
		pod("shop", "rc-1", "n-a", []string{"10.2.0.7"}, ownedBy("ReplicationController", "rc")),
		pod("shop", "late-5c6b-x", "n-a", []string{"10.2.0.8"}, ownedBy("ReplicaSet", "late-5c6b"), labels("pod-template-hash", "5c6b")),
		pod("shop", "bare", "n-a", []string{"10.2.0.9"}, labels("app", "solo")),
	}
	type want struct{ ip, workload, kind string }
	withOwners := []want{
		{"10.2.0.1", "web", "Deployment"},
		{"10.2.0.2", "orphan-rs", "ReplicaSet"},
		{"10.2.0.3", "nightly", "CronJob"},
		{"10.2.0.4", "once", "Job"},
		{"10.2.0.5", "s", "StatefulSet"},
		{"10.2.0.6", "etcd-n-a", "Pod"},
		{"10.2.0.7", "rc", "ReplicationController"},
		{"10.2.0.8", "late", "Deployment"}, // not in the metadata (yet): name pattern
		{"10.2.0.9", "bare", "Pod"},
	}
	// Without a metadata client (or without permission to list owners) the
	// ReplicaSet name pattern names Deployments, and Jobs stay Jobs.
	patternOnly := []want{
		{"10.2.0.1", "web", "Deployment"},
		{"10.2.0.2", "orphan-rs", "ReplicaSet"},
		{"10.2.0.3", "nightly-28000000", "Job"},
		{"10.2.0.4", "once", "Job"},
		{"10.2.0.8", "late", "Deployment"},
	}
	for _, tc := range []struct {
		name string
		opts fixtureOpts
		want []want
	}{
		{"metadata informers", fixtureOpts{objs: pods, owners: owners}, withOwners},
		{"no metadata client", fixtureOpts{objs: pods}, patternOnly},
		{"owners forbidden", fixtureOpts{objs: pods, owners: owners, forbidOwners: true}, patternOnly},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.cfg.PodLabels = []string{"app", "tier"}
			f := newFixture(t, tc.opts)
			for _, w := range tc.want {
				ep := f.r.Resolve(netip.MustParseAddr(w.ip), base)
				if ep.Kind != KindPod || ep.Workload != w.workload || ep.WorkloadKind != w.kind {
					t.Errorf("%s: got %s %s/%s, want pod %s/%s", w.ip, ep.Kind, ep.WorkloadKind, ep.Workload, w.kind, w.workload)
				}
			}
			if got := f.r.Resolve(netip.MustParseAddr("10.2.0.1"), base).Labels; !reflect.DeepEqual(got, []string{"web", ""}) {
				t.Errorf("labels of web pod = %q, want [web \"\"]", got)
			}
		})
	}

	t.Run("owner metadata arriving later renames the pods", func(t *testing.T) {
		f := newFixture(t, fixtureOpts{objs: pods, owners: owners})
		f.createOwner(base.Add(time.Second), ownerMeta("ReplicaSet", "shop", "late-5c6b", "Rollout", "late-rollout"))
		ep := f.r.Resolve(netip.MustParseAddr("10.2.0.8"), base)
		if ep.Workload != "late-rollout" || ep.WorkloadKind != "Rollout" {
			t.Errorf("after the ReplicaSet appeared: %s/%s, want Rollout/late-rollout", ep.WorkloadKind, ep.Workload)
		}
	})
}

func TestResolveBeforeSync(t *testing.T) {
	r, err := New(Config{ReleasedIPTTL: time.Minute, ReleasedIPCacheSize: 8}, newEmptyClient(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if r.HasSynced() {
		t.Fatal("HasSynced before Run")
	}
	got := *r.Resolve(netip.MustParseAddr("10.0.0.1"), base)
	if want := *unknownEP("not_synced"); !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
	if got := *r.Resolve(netip.MustParseAddr("8.8.4.4"), base); !reflect.DeepEqual(got, *externalEP) {
		t.Errorf("public address before sync: got %+v, want external", got)
	}
}

func TestConfigErrors(t *testing.T) {
	bad := writeFile(t, "bad.yaml", "endpoints:\n  - name: x\n    zone: z\n    cidrs: [10.0.0.1/8]\n")
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{ReleasedIPTTL: 0, ReleasedIPCacheSize: 1}, "--released-ip-ttl must be positive, got 0s"},
		{Config{ReleasedIPTTL: time.Second, ReleasedIPCacheSize: -3}, "--released-ip-cache-size must be positive, got -3"},
		{Config{ReleasedIPTTL: time.Second, ReleasedIPCacheSize: 1, StaticEndpointsFile: "/nonexistent/x.yaml"}, `--static-endpoints-file "/nonexistent/x.yaml"`},
		{Config{ReleasedIPTTL: time.Second, ReleasedIPCacheSize: 1, StaticEndpointsFile: bad}, "entry 1 (line 2): line 4: invalid cidr \"10.0.0.1/8\": host bits set"},
		{Config{ReleasedIPTTL: time.Second, ReleasedIPCacheSize: 1, PodLabels: []string{""}}, "empty label name"},
	} {
		_, err := New(tc.cfg, newEmptyClient(), nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) error = %v, want it to contain %q", tc.cfg, err, tc.want)
		}
	}
}

// TestResolveDuringChurn resolves continuously while pods come and go, so
// that `go test -race` checks the locking of the index and the LRU.
func TestResolveDuringChurn(t *testing.T) {
	f := newFixture(t, fixtureOpts{objs: []runtime.Object{nodeA(), nodeB()}})
	stop := inBackground(func(n int) int {
		for i := 0; i < 8; i++ {
			ip := netip.AddrFrom4([4]byte{10, 3, 0, byte(i)})
			if ep := f.r.Resolve(ip, base.Add(time.Duration((n+i)%40)*time.Second)); ep == nil {
				t.Error("nil endpoint")
			}
			f.r.Owner(ip, base)
		}
		return 8
	})
	for round := 0; round < 5; round++ {
		for i := 0; i < 8; i++ {
			at := base.Add(time.Duration(round*10+i) * time.Second)
			name := "p-" + string(rune('a'+i))
			f.createPod(at, pod("churn", name, "n-a", []string{netip.AddrFrom4([4]byte{10, 3, 0, byte(i)}).String()}))
			f.updateNode(at, node("n-a", "z-a", "r-"+string(rune('1'+round%2)), "10.0.0.1"))
			f.deletePod(at.Add(time.Second), "churn", name)
		}
	}
	if stop() == 0 {
		t.Error("resolver goroutine made no lookups")
	}
	// Every pod was deleted: its address resolves to it only within the TTL.
	ip := netip.MustParseAddr("10.3.0.7")
	if got := f.r.Resolve(ip, base.Add(47*time.Second+time.Second/2)); got.Pod != "p-h" {
		t.Errorf("late flow of deleted pod: got %+v", *got)
	}
	if got := f.r.Resolve(ip, base.Add(48*time.Second+ttl+time.Second)); got.Reason != ReasonNoPod {
		t.Errorf("flow after the TTL: got %+v", *got)
	}
}

// TestReleasedMemoryBound checks that addresses forgotten by the LRU leave
// nothing behind in the index: memory stays bounded by the flag.
func TestReleasedMemoryBound(t *testing.T) {
	ix, err := newIndex(2, ttl, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	obj, _ := nodeTransform(nodeA())
	ix.upsertNode(obj.(*corev1.Node))
	for i := 0; i < 5; i++ {
		ip := netip.AddrFrom4([4]byte{10, 4, 0, byte(i)}).String()
		p := pod("ns", "p"+ip, "n-a", []string{ip})
		ix.upsertPod(p, base, false)
		ix.deletePod(p.Namespace, p.Name, p.UID, base.Add(time.Second))
	}
	if n := ix.released.Len(); n != 2 {
		t.Errorf("released LRU holds %d addresses, want 2", n)
	}
	// Two node addresses plus the two remembered releases.
	if n := len(ix.addrs); n != 4 {
		t.Errorf("index holds %d addresses, want 4", n)
	}
	if len(ix.pods) != 0 {
		t.Errorf("index still holds %d pods", len(ix.pods))
	}
}

// TestReuseWindow: an address released and taken by a new pod. Flows
// after the release go to the new pod when it may have held the address
// then (its informer time at most the window after the flow), else to the
// released pod within the TTL; while no pod holds the address, less than
// the window after the release, Owner reports it awaiting one.
func TestReuseWindow(t *testing.T) {
	const window = 2 * time.Second
	ip := netip.MustParseAddr("10.5.0.1")
	release := base.Add(10 * time.Second)
	for _, tc := range []struct {
		name string
		// successor: when the informer shows the new pod (0: never).
		successor time.Duration
		// lookups at flow times after base, with the informer clock at now.
		at, now time.Duration
		want    string // pod name, "" for unknown
		await   bool
	}{
		{"before the release", 0, 9 * time.Second, 10*time.Second + time.Second/2, "old", false},
		{"after the release, nothing shown yet", 0, 11 * time.Second, 11 * time.Second, "old", true},
		{"after the release, window over", 0, 11 * time.Second, 12*time.Second + time.Millisecond, "old", false},
		{"after the TTL", 0, 10*time.Second + ttl + time.Second, 10*time.Second + ttl + time.Second, "", false},
		{"successor shown later", 10*time.Second + time.Second/2, 10*time.Second + time.Second/4, 11 * time.Second, "new", false},
		{"successor shown, flow before the release", 10*time.Second + time.Second/2, 9 * time.Second, 11 * time.Second, "old", false},
		{"successor shown long after the flow", time.Minute, 11 * time.Second, 61 * time.Second, "old", false},
		{"successor shown, flow after it", 10*time.Second + time.Second/2, 12 * time.Second, 13 * time.Second, "new", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, fixtureOpts{cfg: Config{ReleasedIPTTL: ttl, ReuseWindow: window}, objs: []runtime.Object{nodeA(), nodeB()}})
			f.createPod(base, pod("ns", "old", "n-a", []string{ip.String()}))
			f.deletePod(release, "ns", "old")
			if tc.successor != 0 {
				f.createPod(base.Add(tc.successor), pod("ns", "new", "n-a", []string{ip.String()}))
			}
			f.setClock(base.Add(tc.now))
			at := base.Add(tc.at)
			if got := f.r.Resolve(ip, at); got.Pod != tc.want {
				t.Errorf("Resolve at base+%s: pod %q (%+v), want %q", tc.at, got.Pod, *got, tc.want)
			}
			node, await, ok := f.r.Owner(ip, at)
			if await != tc.await {
				t.Errorf("Owner at base+%s, now base+%s: awaiting %v, want %v", tc.at, tc.now, await, tc.await)
			}
			if wantNode := map[bool]string{true: "n-a", false: ""}[tc.want != ""]; node != wantNode || ok != (wantNode != "") {
				t.Errorf("Owner: node %q, %v; want %q", node, ok, wantNode)
			}
		})
	}
}

// Owner says which node ip belonged to at time at (a pod's node, or the
// node of a host address) and whether it awaits a new holder (Lookup).
func (r *Resolver) Owner(ip netip.Addr, at time.Time) (node string, awaiting, ok bool) {
	ep, awaiting := r.Lookup(ip, at, "")
	return ep.Node, awaiting, ep.Node != ""
}

// inBackground calls step over and over on another goroutine, passing it
// the sum of what it returned so far, until the returned stop is called;
// stop returns that sum. Tests run lookups so while informers change the
// state beneath them, for -race to check the locking.
func inBackground(step func(n int) int) (stop func() int) {
	quit := make(chan struct{})
	done := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-quit:
				done <- n
				return
			default:
			}
			n += step(n)
		}
	}()
	return func() int {
		close(quit)
		return <-done
	}
}

// TestReportedRelease: the pod of node n-a holding an address is reported
// released by n-a's agent (Released) at base+10s. n-a's flows stamped
// after its report go to a pod that got the address later, and await one
// while the informer shows none (less than the window after the flow),
// whatever the informer still shows of the released pod; its flows up to
// the release keep the informer's view. Another node's flows after the
// release go to the later pod as after a release the informer saw (the
// released pod's for a flow long before the later pod showed up), and
// await one less than the window after the release.
func TestReportedRelease(t *testing.T) {
	const window = 2 * time.Second
	ip := netip.MustParseAddr("10.5.0.1")
	release := base.Add(10 * time.Second)
	type event struct {
		at   time.Duration // informer time after base
		what string        // "delete" the old pod, "create" the new one, "report" the release
	}
	for _, tc := range []struct {
		name   string
		events []event
		// reporter is the node reporting the release; from the node
		// reporting the flow at base+at, the informer clock at base+now.
		reporter, from string
		at, now        time.Duration
		want           string // pod name, "" for unknown
		await          bool
	}{
		{"own node, before the release", []event{{10 * time.Second, "report"}},
			"n-a", "n-a", 9 * time.Second, 11 * time.Second, "old", false},
		{"own node, the reporting batch", []event{{10 * time.Second, "report"}},
			"n-a", "n-a", 10 * time.Second, 11 * time.Second, "old", false},
		{"own node, after, the informer still shows the old pod", []event{{10 * time.Second, "report"}},
			"n-a", "n-a", 11 * time.Second, 12 * time.Second, "old", true},
		{"own node, after, window over", []event{{10 * time.Second, "report"}},
			"n-a", "n-a", 11 * time.Second, 13*time.Second + time.Millisecond, "", false},
		{"own node, after, deletion shown", []event{{10 * time.Second, "report"}, {10*time.Second + 500*time.Millisecond, "delete"}},
			"n-a", "n-a", 11 * time.Second, 12 * time.Second, "old", true},
		{"own node, after, new pod shown", []event{{10 * time.Second, "report"}, {10*time.Second + 500*time.Millisecond, "delete"}, {10*time.Second + 600*time.Millisecond, "create"}},
			"n-a", "n-a", 11 * time.Second, 12 * time.Second, "new", false},
		{"own node, new pod shown later than the flow", []event{{10 * time.Second, "report"}, {10*time.Second + 500*time.Millisecond, "delete"}, {12 * time.Second, "create"}},
			"n-a", "n-a", 11 * time.Second, 12 * time.Second, "new", false},
		{"own node, new pod shown without the deletion", []event{{10 * time.Second, "report"}, {10*time.Second + 600*time.Millisecond, "create"}},
			"n-a", "n-a", 11 * time.Second, 12 * time.Second, "new", false},
		{"own node, report after the new pod was shown", []event{{10*time.Second + 500*time.Millisecond, "delete"}, {10*time.Second + 600*time.Millisecond, "create"}, {11 * time.Second, "report"}},
			"n-a", "n-a", 11*time.Second + 200*time.Millisecond, 12 * time.Second, "new", false},
		{"own node, reported late, the informer still shows the old pod", []event{{11 * time.Second, "report"}},
			"n-a", "n-a", 11*time.Second + 200*time.Millisecond, 12 * time.Second, "old", true},
		{"own node, report after the new pod was shown, flow before the release", []event{{10*time.Second + 500*time.Millisecond, "delete"}, {10*time.Second + 600*time.Millisecond, "create"}, {11 * time.Second, "report"}},
			"n-a", "n-a", 9 * time.Second, 12 * time.Second, "old", false},
		{"another node, after, window over", []event{{10 * time.Second, "report"}},
			"n-a", "n-b", 11 * time.Second, 12 * time.Second, "old", false},
		{"another node, after, the informer still shows the old pod", []event{{10 * time.Second, "report"}},
			"n-a", "n-b", 11 * time.Second, 11*time.Second + 500*time.Millisecond, "old", true},
		{"another node, before the release", []event{{10 * time.Second, "report"}},
			"n-a", "n-b", 9 * time.Second, 11*time.Second + 500*time.Millisecond, "old", false},
		{"another node, after, new pod shown", []event{{10 * time.Second, "report"}, {10*time.Second + 600*time.Millisecond, "create"}},
			"n-a", "n-b", 11 * time.Second, 11*time.Second + 500*time.Millisecond, "new", false},
		{"another node, new pod shown long after the flow", []event{{10 * time.Second, "report"}, {14 * time.Second, "create"}},
			"n-a", "n-b", 11 * time.Second, 15 * time.Second, "old", false},
		{"reported by a node that did not hold it", []event{{10 * time.Second, "report"}},
			"n-b", "n-b", 11 * time.Second, 12 * time.Second, "old", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, fixtureOpts{cfg: Config{ReleasedIPTTL: ttl, ReuseWindow: window}, objs: []runtime.Object{nodeA(), nodeB()}})
			f.createPod(base, pod("ns", "old", "n-a", []string{ip.String()}))
			for _, e := range tc.events {
				switch e.what {
				case "delete":
					f.deletePod(base.Add(e.at), "ns", "old")
				case "create":
					f.createPod(base.Add(e.at), pod("ns", "new", "n-a", []string{ip.String()}))
				case "report":
					f.setClock(base.Add(e.at))
					// Seen at the release, reported in a batch
					// stamped when the report arrives.
					if got, want := f.r.Released(ip, tc.reporter, release, base.Add(e.at)), tc.reporter == "n-a"; got != want {
						t.Fatalf("Released by %s = %v, want %v", tc.reporter, got, want)
					}
				}
			}
			f.setClock(base.Add(tc.now))
			ep, await := f.r.Lookup(ip, base.Add(tc.at), tc.from)
			if ep.Pod != tc.want || await != tc.await {
				t.Errorf("Lookup at base+%s from %s, now base+%s: pod %q awaiting %v; want %q, %v", tc.at, tc.from, tc.now, ep.Pod, await, tc.want, tc.await)
			}
			if tc.want == "" && ep.Reason != ReasonNoPod {
				t.Errorf("unknown endpoint with reason %q, want %q", ep.Reason, ReasonNoPod)
			}
		})
	}
	t.Run("an earlier report changes nothing", func(t *testing.T) {
		f := newFixture(t, fixtureOpts{cfg: Config{ReleasedIPTTL: ttl, ReuseWindow: window}, objs: []runtime.Object{nodeA(), nodeB()}})
		f.createPod(base, pod("ns", "old", "n-a", []string{ip.String()}))
		f.setClock(release)
		if !f.r.Released(ip, "n-a", release, release) {
			t.Fatal("first report not recorded")
		}
		if f.r.Released(ip, "n-a", release.Add(-time.Second), release.Add(time.Second)) {
			t.Error("an earlier report was recorded over a later one")
		}
		if ep, await := f.r.Lookup(ip, release.Add(-time.Second/2), "n-a"); ep.Pod != "old" || await {
			t.Errorf("flow between the two reports: pod %q awaiting %v, want old", ep.Pod, await)
		}
	})
	t.Run("a release after its batch", func(t *testing.T) {
		f := newFixture(t, fixtureOpts{cfg: Config{ReleasedIPTTL: ttl, ReuseWindow: window}, objs: []runtime.Object{nodeA()}})
		f.createPod(base, pod("ns", "old", "n-a", []string{ip.String()}))
		if f.r.Released(ip, "n-a", release, release.Add(-time.Millisecond)) {
			t.Error("a release stamped after its batch was recorded")
		}
	})
	t.Run("memory bound", func(t *testing.T) {
		f := newFixture(t, fixtureOpts{cfg: Config{ReleasedIPTTL: ttl, ReuseWindow: window, ReleasedIPCacheSize: 4}, objs: []runtime.Object{nodeA()}})
		for i := range 10 {
			a := netip.AddrFrom4([4]byte{10, 5, 1, byte(i)})
			f.createPod(base, pod("ns", fmt.Sprintf("p%d", i), "n-a", []string{a.String()}))
		}
		f.setClock(release)
		for i := range 10 {
			if !f.r.Released(netip.AddrFrom4([4]byte{10, 5, 1, byte(i)}), "n-a", release, release) {
				t.Fatalf("release %d not recorded", i)
			}
		}
		if n := f.r.ix.cuts.Len(); n != 4 {
			t.Errorf("%d releases remembered, want the cache size 4", n)
		}
		// The oldest were forgotten: their flows keep the informer's view.
		if ep, await := f.r.Lookup(netip.AddrFrom4([4]byte{10, 5, 1, 0}), release.Add(time.Second), "n-a"); ep.Pod != "p0" || await {
			t.Errorf("forgotten release: pod %q awaiting %v, want p0", ep.Pod, await)
		}
		if _, await := f.r.Lookup(netip.AddrFrom4([4]byte{10, 5, 1, 9}), release.Add(time.Second), "n-a"); !await {
			t.Error("a remembered release does not hold the flow")
		}
	})
}
