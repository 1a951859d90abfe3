package server

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// serviceSlice is an EndpointSlice of Service shop/db with one endpoint
// per address and zone.
func serviceSlice(ready map[string]bool, zones map[string]string) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "shop", Name: "db-ipv4", Labels: map[string]string{discoveryv1.LabelServiceName: "db"}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for _, addr := range slices.Sorted(maps.Keys(zones)) {
		r, z := ready[addr], zones[addr]
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{addr},
			Conditions: discoveryv1.EndpointConditions{Ready: &r}, Zone: &z})
	}
	return es
}

// viaService is rec to a Service's virtual address: the packets went to
// dst after kube-proxy's DNAT of vip.
func viaService(src, dst, vip string, bytes, packets uint64) flow.Record {
	r := rec(src, dst, 5432, bytes, packets)
	r.OrigDst = netip.MustParseAddrPort(vip)
	return r
}

// TestIngestServiceSeries: flows addressed to a Service's virtual IP feed
// the Service series by source workload and zone pair, avoidable exactly
// when a ready endpoint was in the source's zone at the flow's time; an
// endpoint turning not ready changes the answer from then on; a
// destination-NATed address no Service holds is counted and left out.
func TestIngestServiceSeries(t *testing.T) {
	td := "PreferSameZone"
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "db"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"}, TrafficDistribution: &td,
			Ports: []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: 5432}}},
	}
	zones := map[string]string{"10.0.1.2": "zone-a", "10.0.2.1": "zone-b"}
	client := fake.NewClientset(
		node("node-a", "zone-a", "192.168.0.1"), node("node-b", "zone-b", "192.168.0.2"), node("node-c", "zone-c", "192.168.0.3"),
		statefulPod("shop", "web-0", "web", "node-a", "10.0.1.1"),
		statefulPod("shop", "web-1", "web", "node-c", "10.0.3.1"),
		statefulPod("shop", "db-0", "db", "node-a", "10.0.1.2"),
		statefulPod("shop", "db-1", "db", "node-b", "10.0.2.1"),
		svc, serviceSlice(map[string]bool{"10.0.1.2": true, "10.0.2.1": true}, zones))
	res := realResolverOn(t, client, resolve.Config{ReleasedIPTTL: time.Minute, ReleasedIPCacheSize: 1024})
	waitUntil(t, "the Service known", func() bool {
		return res.Service(netip.MustParseAddrPort("10.96.0.10:5432"), 6, time.Now()) != nil
	})
	env := realEnv(t, res)
	post := func(node string, seq uint64, at time.Time, flows ...flow.Record) {
		t.Helper()
		b := batch(node, seq, flows...)
		b.Time = at
		if code, msg := env.do(t, req{body: encode(b)}); code != http.StatusNoContent {
			t.Fatalf("batch %s/%d: %d %s", node, seq, code, msg)
		}
	}
	post("node-a", 1, time.Now(),
		viaService("10.0.1.1", "10.0.2.1", "10.96.0.10:5432", 1000, 10), // zone a had a ready endpoint: avoidable
		viaService("10.0.1.1", "10.0.1.2", "10.96.0.10:5432", 400, 4),   // same zone
		viaService("10.0.1.1", "10.0.2.1", "10.96.9.9:5432", 77, 7),     // no Service there
		rec("10.0.1.1", "10.0.2.1", 5432, 50, 1))                        // straight to the pod
	post("node-c", 1, time.Now(),
		viaService("10.0.3.1", "10.0.2.1", "10.96.0.10:5432", 300, 3)) // no endpoint in zone c: not avoidable

	// db-0 (zone a) turns not ready: from then on, crossing from zone a
	// cannot be avoided.
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Update(context.Background(),
		serviceSlice(map[string]bool{"10.0.1.2": false, "10.0.2.1": true}, zones), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	s := res.Service(netip.MustParseAddrPort("10.96.0.10:5432"), 6, time.Now())
	// The wire carries a batch's time in milliseconds: wait until db-0 is
	// not ready at the millisecond a batch stamped now arrives with.
	waitUntil(t, "db-0 not ready", func() bool {
		ready, _ := res.ReadyInZone(s, "zone-a", time.Now().Truncate(time.Millisecond))
		return !ready
	})
	post("node-a", 2, time.Now(), viaService("10.0.1.1", "10.0.2.1", "10.96.0.10:5432", 2000, 20))

	series := func(avoidable, src, dst string, v int) string {
		return fmt.Sprintf(`kubezonnet_service_bytes_total{avoidable=%q,dst_zone=%q,service="db",service_namespace="shop",src_namespace="shop",src_workload="web",src_workload_kind="StatefulSet",src_zone=%q,traffic_distribution="PreferSameZone"} %d`,
			avoidable, dst, src, v)
	}
	var got []string
	for _, l := range env.series() {
		if strings.HasPrefix(l, "kubezonnet_service_bytes_total") {
			got = append(got, l)
		}
	}
	want := []string{
		series("false", "zone-a", "zone-a", 400),
		series("false", "zone-a", "zone-b", 2000),
		series("false", "zone-c", "zone-b", 300),
		series("true", "zone-a", "zone-b", 1000),
	}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("Service series:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
	}
	if v := env.metric("kubezonnet_server_flows_without_service_total", ""); v != 1 {
		t.Errorf("flows without a Service = %v, want 1", v)
	}
	// Every byte is still in the pairs: web-0 -> db-1 is 1000 + 77 + 50 + 2000.
	if want := `pod_cross_zone_network_traffic_bytes_total{namespace="shop",pod="web-0"} 3127`; !slices.Contains(env.series(), want) {
		t.Errorf("no %s in %v", want, env.series())
	}
}
