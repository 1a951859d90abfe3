package testenv

import (
	"context"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubezonnet/kubezonnet/internal/logging"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// The resolver's Service index against the real API server, through the
// server's own kubeconfig (deploy/'s ClusterRole): a Service gets its
// cluster IP from the API server's allocator, its EndpointSlice is
// written as the EndpointSlice controller would (none runs here), and
// the resolver names the Service by virtual IP, port and protocol, says
// whether it had a ready endpoint in a zone at a time, and keeps
// answering for late flows once the Service is deleted.
func TestResolverServicesOnAPIServer(t *testing.T) {
	env := sharedEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	admin, err := env.ControlPlane.AdminClient()
	if err != nil {
		t.Fatal(err)
	}
	const ns = "svc-test"
	if err := ensureNamespace(ctx, admin, ns); err != nil {
		t.Fatal(err)
	}
	td := corev1.ServiceTrafficDistributionPreferSameZone
	svc, err := admin.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP},
				{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
			},
			TrafficDistribution: &td,
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip, err := netip.ParseAddr(svc.Spec.ClusterIP)
	if err != nil {
		t.Fatalf("the API server allocated no cluster IP: %q", svc.Spec.ClusterIP)
	}
	ready, notReady := true, false
	zone := func(z string) *string { return &z }
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-abcde", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.1.5"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}, Zone: zone("z-a"),
				Hints: &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: "z-a"}}}},
			{Addresses: []string{"10.244.2.5"}, Conditions: discoveryv1.EndpointConditions{Ready: &notReady}, Zone: zone("z-b")},
		},
	}
	if es, err = admin.DiscoveryV1().EndpointSlices(ns).Create(ctx, es, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	const ttl = time.Minute
	res, err := resolve.New(resolve.Config{ReleasedIPTTL: ttl, ReleasedIPCacheSize: 1024},
		clientFromKubeconfig(t, env.ServerKubeconfig), logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- res.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for !cond() {
			select {
			case <-ctx.Done():
				t.Fatalf("gave up waiting for %s", what)
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	waitFor("the resolver to sync", res.HasSynced)

	dst := netip.AddrPortFrom(vip, 80)
	got := res.Service(dst, 6, time.Now())
	if got == nil || got.Namespace != ns || got.Name != "web" || got.TrafficDistribution != td {
		t.Fatalf("Service(%s, tcp) = %+v; want %s/web with %s", dst, got, ns, td)
	}
	if got := res.Service(netip.AddrPortFrom(vip, 53), 17, time.Now()); got == nil || got.Name != "web" {
		t.Errorf("Service(%s:53, udp) = %+v; want %s/web", vip, got, ns)
	}
	if got := res.Service(netip.AddrPortFrom(vip, 53), 6, time.Now()); got != nil {
		t.Errorf("Service(%s:53, tcp) = %+v; the port is UDP only", vip, got)
	}
	now := time.Now()
	if r, h := res.ReadyInZone(got, "z-a", now); !r || !h {
		t.Errorf("z-a: ready %v, hinted %v; want both", r, h)
	}
	if r, h := res.ReadyInZone(got, "z-b", now); r || h {
		t.Errorf("z-b: ready %v, hinted %v; want neither (its endpoint is not ready)", r, h)
	}

	// The z-a endpoint turns not ready: from the moment the informer
	// sees it, not before.
	before := time.Now()
	es.Endpoints[0].Conditions.Ready = &notReady
	if _, err := admin.DiscoveryV1().EndpointSlices(ns).Update(ctx, es, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("z-a to turn not ready", func() bool {
		r, _ := res.ReadyInZone(got, "z-a", time.Now())
		return !r
	})
	if r, _ := res.ReadyInZone(got, "z-a", before); !r {
		t.Error("z-a not ready before its endpoint turned not ready")
	}

	// Deleted: late flows still find it within the window, later ones not.
	if err := admin.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("the deletion", func() bool {
		return res.Service(dst, 6, time.Now().Add(ttl+time.Second)) == nil
	})
	if got := res.Service(dst, 6, time.Now()); got == nil || got.Name != "web" {
		t.Errorf("right after the deletion, Service(%s) = %+v; want %s/web", dst, got, ns)
	}
}
