package resolve

import (
	"fmt"
	"net/netip"
	"runtime"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

const (
	benchPods  = 10000
	benchNodes = 100
)

// benchPod is a realistic pod: Deployment-owned, dual-stack, with the
// labels and spec the transform removes.
func benchPod(i int) *corev1.Pod {
	p := pod("ns-"+fmt.Sprint(i%50), fmt.Sprintf("web-%d-7d9f8c6b5-abcde", i), fmt.Sprintf("node-%d", i%benchNodes),
		[]string{benchIPv4(i).String(), benchIPv6(i).String()},
		ownedBy("ReplicaSet", fmt.Sprintf("web-%d-7d9f8c6b5", i)),
		labels("pod-template-hash", "7d9f8c6b5", "app", fmt.Sprintf("web-%d", i), "team", "shop"))
	p.Annotations = map[string]string{"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"}
	return p
}

func benchIPv4(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 64 + byte(i>>16), byte(i >> 8), byte(i)})
}

func benchIPv6(i int) netip.Addr {
	return netip.AddrFrom16([16]byte{0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, byte(i >> 8), byte(i)})
}

// newBenchResolver indexes benchPods pods on benchNodes nodes through the
// same transforms and index updates the informers use.
func newBenchResolver(b *testing.B) *Resolver {
	b.Helper()
	r, err := New(Config{ReleasedIPTTL: DefaultReleasedIPTTL, ReleasedIPCacheSize: DefaultReleasedIPCacheSize},
		newEmptyClient(), nil)
	if err != nil {
		b.Fatal(err)
	}
	r.static = newStaticTable([]StaticEndpoint{{Name: "db", Zone: "z-0", CIDRs: prefixes("172.20.0.0/16")}})
	for n := 0; n < benchNodes; n++ {
		obj, _ := nodeTransform(node(fmt.Sprintf("node-%d", n), fmt.Sprintf("z-%d", n%3), "r-1",
			netip.AddrFrom4([4]byte{10, 0, byte(n >> 8), byte(n)}).String()))
		r.ix.upsertNode(obj.(*corev1.Node))
	}
	tr := podTransform(nil)
	for i := 0; i < benchPods; i++ {
		obj, _ := tr(benchPod(i))
		r.ix.upsertPod(obj.(*corev1.Pod), base, true)
	}
	r.synced.Store(true)
	return r
}

// BenchmarkResolve measures the hot path with 10,000 pods indexed. The
// sub-benchmarks cover each way out of Resolve; "pod" is the common case.
func BenchmarkResolve(b *testing.B) {
	r := newBenchResolver(b)
	// A released pod with a later holder: flows older than the reuse go
	// through the released-IP LRU.
	reused := netip.MustParseAddr("10.99.0.1")
	obj, _ := podTransform(nil)(pod("ns-x", "leaver", "node-1", []string{reused.String()}))
	r.ix.upsertPod(obj.(*corev1.Pod), base, true)
	r.ix.deletePod("ns-x", "leaver", "uid-ns-x-leaver", base.Add(time.Minute))
	obj, _ = podTransform(nil)(pod("ns-x", "reuser", "node-1", []string{reused.String()}))
	r.ix.upsertPod(obj.(*corev1.Pod), base.Add(2*time.Minute), false)

	const n = 4096
	at := base.Add(time.Hour)
	cases := []struct {
		name string
		ip   func(i int) netip.Addr
		at   time.Time
		kind Kind
	}{
		{"pod", func(i int) netip.Addr { return benchIPv4((i * 7919) % benchPods) }, at, KindPod},
		{"pod-ipv6", func(i int) netip.Addr { return benchIPv6((i * 7919) % benchPods) }, at, KindPod},
		{"node", func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 0, byte(i % benchNodes)}) }, at, KindNode},
		{"released", func(int) netip.Addr { return reused }, base.Add(90 * time.Second), KindPod},
		{"static", func(i int) netip.Addr { return netip.AddrFrom4([4]byte{172, 20, byte(i >> 8), byte(i)}) }, at, KindStatic},
		{"external", func(i int) netip.Addr { return netip.AddrFrom4([4]byte{8, 8, byte(i >> 8), byte(i)}) }, at, KindExternal},
		{"unknown", func(i int) netip.Addr { return netip.AddrFrom4([4]byte{192, 168, byte(i >> 8), byte(i)}) }, at, KindUnknown},
	}
	for _, c := range cases {
		ips := make([]netip.Addr, n)
		for i := range ips {
			ips[i] = c.ip(i)
			if k := r.Resolve(ips[i], c.at).Kind; k != c.kind {
				b.Fatalf("%s: %s resolved to %s, want %s", c.name, ips[i], k, c.kind)
			}
		}
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			var sink *Endpoint
			i := 0
			cpu0 := cpuTime()
			for b.Loop() {
				sink = r.Resolve(ips[i&(n-1)], c.at)
				i++
			}
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
			_ = sink
		})
	}
}

// BenchmarkIndexMemory reports the heap cost per pod: "index-B/pod" is the
// resolver's own state (pod state, address slots, endpoint), "cache-B/pod"
// the transformed Pod the informer cache keeps, and "released-B/IP" what a
// released address costs in the LRU and the index once every pod is gone.
// Each op builds and empties the index.
func BenchmarkIndexMemory(b *testing.B) {
	for b.Loop() {
		start := heapInUse()
		tr := podTransform(nil)
		objs := make([]*corev1.Pod, benchPods)
		for i := range objs {
			obj, _ := tr(benchPod(i))
			objs[i] = obj.(*corev1.Pod)
		}
		cached := heapInUse()

		r, _ := New(Config{ReleasedIPTTL: time.Minute, ReleasedIPCacheSize: 2 * benchPods}, newEmptyClient(), nil)
		for n := 0; n < benchNodes; n++ {
			obj, _ := nodeTransform(node(fmt.Sprintf("node-%d", n), "z", "r"))
			r.ix.upsertNode(obj.(*corev1.Node))
		}
		withNodes := heapInUse()
		for _, p := range objs {
			r.ix.upsertPod(p, base, true)
		}
		indexed := heapInUse()
		for _, p := range objs {
			r.ix.deletePod(p.Namespace, p.Name, p.UID, base.Add(time.Second))
		}
		released := heapInUse()
		runtime.KeepAlive(objs)
		runtime.KeepAlive(r)
		b.ReportMetric(float64(cached-start)/benchPods, "cache-B/pod")
		b.ReportMetric(float64(indexed-withNodes)/benchPods, "index-B/pod")
		b.ReportMetric(float64(released-withNodes)/(2*benchPods), "released-B/IP")
	}
}

// cpuTime is the user+system CPU time of this process. On a machine shared
// with other jobs it is steadier than wall time, which also counts the time
// the benchmark waited for a core.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func heapInUse() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

const (
	benchServices = 5000
	benchZones    = 3
)

// benchService is a dual-stack Service with two TCP ports and one UDP
// port, and its two EndpointSlices (one per family) with an endpoint in
// each zone, hinted for its own zone.
func benchService(i int) (*corev1.Service, []*discoveryv1.EndpointSlice) {
	ns, name := "ns-"+fmt.Sprint(i%50), fmt.Sprintf("svc-%d", i)
	s := service(ns, name, []string{benchVIPv4(i).String(), benchVIPv6(i).String()}, []string{"80", "443", "53/UDP"},
		trafficDistribution(corev1.ServiceTrafficDistributionPreferSameZone))
	var eps []ep
	for z := range benchZones {
		eps = append(eps, ready(fmt.Sprintf("z-%d", z), fmt.Sprintf("z-%d", z)))
	}
	return s, []*discoveryv1.EndpointSlice{
		slice(ns, name+"-v4", name, discoveryv1.AddressTypeIPv4, eps...),
		slice(ns, name+"-v6", name, discoveryv1.AddressTypeIPv6, eps...),
	}
}

func benchVIPv4(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}) }

func benchVIPv6(i int) netip.Addr {
	return netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, byte(i >> 8), byte(i)})
}

// newBenchServices indexes benchServices Services through the same
// transforms and table updates the informers use; each zone of each
// Service then turns not ready and ready again, so lookups search a
// history of a few transitions.
func newBenchServices(b *testing.B) *serviceTable {
	b.Helper()
	tab := newServiceTable(DefaultReleasedIPTTL, DefaultReuseWindow)
	t0 := base.UnixNano()
	for i := range benchServices {
		s, slices := benchService(i)
		obj, _ := serviceTransform(s)
		tab.upsertService(obj.(*corev1.Service), t0, true)
		for _, es := range slices {
			obj, _ := endpointSliceTransform(es)
			tab.upsertSlice(obj.(*discoveryv1.EndpointSlice), t0, true)
		}
		for k, ready := range []bool{false, true} {
			for _, es := range slices {
				es = es.DeepCopy()
				for j := range es.Endpoints {
					es.Endpoints[j].Conditions.Ready = &ready
				}
				obj, _ := endpointSliceTransform(es)
				tab.upsertSlice(obj.(*discoveryv1.EndpointSlice), t0+int64(k+1)*int64(time.Second), false)
			}
		}
	}
	return tab
}

// BenchmarkServiceLookup measures what the ingest path asks of a flow to
// a Service's virtual IP, with 5,000 Services indexed: "vip" finds the
// Service, "vip+zone" also reads whether it had a ready endpoint in the
// client's zone at the flow's time, "unknown" is an address no Service
// has (most flows).
func BenchmarkServiceLookup(b *testing.B) {
	tab := newBenchServices(b)
	r := &Resolver{svc: tab}
	const n = 4096
	at := base.Add(time.Minute)
	dsts := make([]netip.AddrPort, n)
	unknown := make([]netip.AddrPort, n)
	zones := make([]string, n)
	for i := range dsts {
		k := (i * 7919) % benchServices
		ip := benchVIPv4(k)
		if i%2 == 1 {
			ip = benchVIPv6(k)
		}
		dsts[i] = netip.AddrPortFrom(ip, 443)
		unknown[i] = netip.AddrPortFrom(benchIPv4(i), 443)
		zones[i] = fmt.Sprintf("z-%d", i%benchZones)
		svc := r.Service(dsts[i], protoTCP, at)
		if svc == nil {
			b.Fatalf("%s: no Service", dsts[i])
		}
		if ready, hinted := r.ReadyInZone(svc, zones[i], at); !ready || !hinted {
			b.Fatalf("%s in %s: ready %v, hinted %v", dsts[i], zones[i], ready, hinted)
		}
		if before, _ := r.ReadyInZone(svc, zones[i], base.Add(1500*time.Millisecond)); before {
			b.Fatalf("%s in %s: ready while its endpoints were not", dsts[i], zones[i])
		}
	}
	for _, c := range []struct {
		name string
		run  func(i int) bool
	}{
		{"vip", func(i int) bool {
			return r.Service(dsts[i], protoTCP, at) != nil
		}},
		{"vip+zone", func(i int) bool {
			ready, _ := r.ReadyInZone(r.Service(dsts[i], protoTCP, at), zones[i], at)
			return ready
		}},
		{"unknown", func(i int) bool {
			return r.Service(unknown[i], protoTCP, at) != nil
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			var sink bool
			i := 0
			cpu0 := cpuTime()
			for b.Loop() {
				sink = c.run(i & (n - 1))
				i++
			}
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
			_ = sink
		})
	}
}

// BenchmarkServiceMemory reports the heap cost per Service: "table-B/svc"
// is the table's own state for a Service of the benchmark's shape (six
// virtual IP entries, three zones with a few transitions each),
// "cache-B/svc" the transformed Service and EndpointSlices the informer
// caches keep, and "deleted-B/svc" what a deleted Service costs until the
// window passes.
func BenchmarkServiceMemory(b *testing.B) {
	for b.Loop() {
		start := heapInUse()
		var objs []any
		for i := range benchServices {
			s, slices := benchService(i)
			obj, _ := serviceTransform(s)
			objs = append(objs, obj)
			for _, es := range slices {
				obj, _ := endpointSliceTransform(es)
				objs = append(objs, obj)
			}
		}
		cached := heapInUse()
		runtime.KeepAlive(objs)
		objs = nil
		start2 := heapInUse()
		tab := newBenchServices(b)
		indexed := heapInUse()
		t1 := base.Add(time.Minute).UnixNano()
		for i := range benchServices {
			s, slices := benchService(i)
			tab.deleteService(s.Namespace, s.Name, s.UID, t1)
			for _, es := range slices {
				tab.deleteSlice(es.Namespace, es.Name, t1)
			}
		}
		deleted := heapInUse()
		runtime.KeepAlive(tab)
		b.ReportMetric(float64(cached-start)/benchServices, "cache-B/svc")
		b.ReportMetric(float64(indexed-start2)/benchServices, "table-B/svc")
		b.ReportMetric(float64(deleted-start2)/benchServices, "deleted-B/svc")
	}
}
