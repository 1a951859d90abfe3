package resolve

import (
	"fmt"
	"net/netip"
	"runtime"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
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
