package resolve

import (
	"context"
	"fmt"
	"math"
	"net/netip"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
)

// Fixture actions on Services and EndpointSlices.

func (f *fixture) createService(at time.Time, s *corev1.Service) {
	f.apply(at, "create service "+s.Name, func(ctx context.Context) error {
		_, err := f.kube.CoreV1().Services(s.Namespace).Create(ctx, s, metav1.CreateOptions{})
		return err
	})
}

func (f *fixture) updateService(at time.Time, s *corev1.Service) {
	f.apply(at, "update service "+s.Name, func(ctx context.Context) error {
		_, err := f.kube.CoreV1().Services(s.Namespace).Update(ctx, s, metav1.UpdateOptions{})
		return err
	})
}

func (f *fixture) deleteService(at time.Time, ns, name string) {
	f.apply(at, "delete service "+name, func(ctx context.Context) error {
		return f.kube.CoreV1().Services(ns).Delete(ctx, name, metav1.DeleteOptions{})
	})
}

func (f *fixture) createSlice(at time.Time, es *discoveryv1.EndpointSlice) {
	f.apply(at, "create endpointslice "+es.Name, func(ctx context.Context) error {
		_, err := f.kube.DiscoveryV1().EndpointSlices(es.Namespace).Create(ctx, es, metav1.CreateOptions{})
		return err
	})
}

func (f *fixture) updateSlice(at time.Time, es *discoveryv1.EndpointSlice) {
	f.apply(at, "update endpointslice "+es.Name, func(ctx context.Context) error {
		_, err := f.kube.DiscoveryV1().EndpointSlices(es.Namespace).Update(ctx, es, metav1.UpdateOptions{})
		return err
	})
}

func (f *fixture) deleteSlice(at time.Time, ns, name string) {
	f.apply(at, "delete endpointslice "+name, func(ctx context.Context) error {
		return f.kube.DiscoveryV1().EndpointSlices(ns).Delete(ctx, name, metav1.DeleteOptions{})
	})
}

// Object builders.

type svcOpt func(*corev1.Service)

// service builds a ClusterIP Service; ports are "53/UDP", "80" (TCP), ...
func service(ns, name string, ips []string, ports []string, opts ...svcOpt) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-svc-" + ns + "-" + name),
			Annotations: map[string]string{"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIPs: ips, Selector: map[string]string{"app": name}},
	}
	if len(ips) > 0 {
		s.Spec.ClusterIP = ips[0]
	}
	for _, p := range ports {
		num, proto, _ := strings.Cut(p, "/")
		port, err := strconv.Atoi(num)
		if err != nil {
			panic(err)
		}
		s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: p, Port: int32(port), Protocol: corev1.Protocol(proto)})
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func trafficDistribution(td string) svcOpt {
	return func(s *corev1.Service) { s.Spec.TrafficDistribution = &td }
}

func svcUID(u string) svcOpt { return func(s *corev1.Service) { s.UID = types.UID(u) } }

// ep is one endpoint: its zone, readiness and the zones it is hinted for.
type ep struct {
	zone  string
	ready *bool // nil: unset, which means ready
	hints []string
}

func ready(zone string, hints ...string) ep { return ep{zone: zone, hints: hints} }

func notReady(zone string, hints ...string) ep {
	f := false
	return ep{zone: zone, ready: &f, hints: hints}
}

func readyTrue(zone string) ep { return ep{zone: zone, ready: ptrTrue()} }

func slice(ns, name, svc string, family discoveryv1.AddressType, eps ...ep) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-es-" + name), Labels: map[string]string{
			discoveryv1.LabelServiceName: svc,
			discoveryv1.LabelManagedBy:   "endpointslice-controller.k8s.io",
		}},
		AddressType: family,
		Ports:       []discoveryv1.EndpointPort{{Port: ptrInt32(8080)}},
	}
	for i, e := range eps {
		d := discoveryv1.Endpoint{
			Addresses:  []string{fmt.Sprintf("10.1.9.%d", i+1)},
			Conditions: discoveryv1.EndpointConditions{Ready: e.ready, Serving: ptrTrue()},
			NodeName:   ptrString("n-" + e.zone),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Name: fmt.Sprintf("%s-%d", svc, i)},
		}
		if e.zone != "" {
			d.Zone = ptrString(e.zone)
		}
		if e.hints != nil {
			d.Hints = &discoveryv1.EndpointHints{}
			for _, h := range e.hints {
				d.Hints.ForZones = append(d.Hints.ForZones, discoveryv1.ForZone{Name: h})
			}
		}
		es.Endpoints = append(es.Endpoints, d)
	}
	return es
}

func ptrString(s string) *string { return &s }
func ptrInt32(i int32) *int32    { return &i }

// svcLookup is one Service lookup: dst (addr:port) and proto at base+at
// must give want ("namespace/name", "" for none) with traffic distribution
// td; zones lists zone answers expected at the same time.
type svcLookup struct {
	dst   string
	proto uint8
	at    time.Duration
	want  string
	td    string
	zones []zoneAnswer
}

type zoneAnswer struct {
	zone          string
	ready, hinted bool
}

type svcStep struct {
	at     time.Duration
	act    func(f *fixture, at time.Time)
	checks []svcLookup
}

func TestService(t *testing.T) {
	const (
		tcp = protoTCP
		udp = protoUDP
	)
	dns := func(opts ...svcOpt) *corev1.Service {
		return service("kube-system", "dns", []string{"10.96.0.10", "fd00:96::a"}, []string{"53/UDP", "53/TCP", "9153"}, opts...)
	}
	web := func(opts ...svcOpt) *corev1.Service {
		return service("shop", "web", []string{"10.96.1.1"}, []string{"80"}, opts...)
	}
	za := func(r, h bool) zoneAnswer { return zoneAnswer{"z-a", r, h} }
	zb := func(r, h bool) zoneAnswer { return zoneAnswer{"z-b", r, h} }
	zc := func(r, h bool) zoneAnswer { return zoneAnswer{"z-c", r, h} }

	cases := []struct {
		name  string
		opts  fixtureOpts
		steps []svcStep
	}{
		{
			name: "dual-stack Service with ports of two protocols",
			opts: fixtureOpts{objs: []runtime.Object{dns()}},
			steps: []svcStep{{checks: []svcLookup{
				{dst: "10.96.0.10:53", proto: udp, want: "kube-system/dns"},
				{dst: "10.96.0.10:53", proto: tcp, want: "kube-system/dns"},
				{dst: "10.96.0.10:9153", proto: tcp, want: "kube-system/dns"},
				{dst: "[fd00:96::a]:53", proto: udp, want: "kube-system/dns"},
				{dst: "[fd00:96::a]:9153", proto: tcp, want: "kube-system/dns"},
				{dst: "[::ffff:10.96.0.10]:53", proto: udp, want: "kube-system/dns"},
				{dst: "10.96.0.10:9153", proto: udp},     // no such port for UDP
				{dst: "10.96.0.10:54", proto: udp},       // no such port
				{dst: "10.96.0.11:53", proto: udp},       // unknown virtual IP
				{dst: "[fd00:96::b]:53", proto: udp},     // unknown virtual IP
				{dst: "10.96.0.10:53", proto: protoSCTP}, // no such protocol
			}}},
		},
		{
			name: "endpoints split over two slices turn not ready and back; a zone without endpoints",
			opts: fixtureOpts{objs: []runtime.Object{
				web(trafficDistribution(corev1.ServiceTrafficDistributionPreferSameZone)),
				slice("shop", "web-v4-a", "web", discoveryv1.AddressTypeIPv4, ready("z-a"), readyTrue("z-b")),
				slice("shop", "web-v4-b", "web", discoveryv1.AddressTypeIPv4, ready("z-a")),
			}},
			steps: []svcStep{
				{checks: []svcLookup{
					{dst: "10.96.1.1:80", proto: tcp, at: -time.Hour, want: "shop/web", td: "PreferSameZone", zones: []zoneAnswer{za(true, false), zb(true, false), zc(false, false), {"", false, false}}},
				}},
				// One of the two z-a endpoints goes: z-a still has one.
				{at: 30 * time.Second, act: func(f *fixture, at time.Time) {
					f.updateSlice(at, slice("shop", "web-v4-a", "web", discoveryv1.AddressTypeIPv4, notReady("z-a"), readyTrue("z-b")))
				}, checks: []svcLookup{
					{dst: "10.96.1.1:80", proto: tcp, at: 31 * time.Second, want: "shop/web", td: "PreferSameZone", zones: []zoneAnswer{za(true, false), zb(true, false)}},
				}},
				// The other one, in the other slice: z-a has none from then on.
				{at: 60 * time.Second, act: func(f *fixture, at time.Time) {
					f.updateSlice(at, slice("shop", "web-v4-b", "web", discoveryv1.AddressTypeIPv4, notReady("z-a")))
				}, checks: []svcLookup{
					{dst: "10.96.1.1:80", proto: tcp, at: 59 * time.Second, want: "shop/web", td: "PreferSameZone", zones: []zoneAnswer{za(true, false), zb(true, false)}},
					{dst: "10.96.1.1:80", proto: tcp, at: 60 * time.Second, want: "shop/web", td: "PreferSameZone", zones: []zoneAnswer{za(false, false), zb(true, false)}},
					{dst: "10.96.1.1:80", proto: tcp, at: 61 * time.Second, want: "shop/web", td: "PreferSameZone", zones: []zoneAnswer{za(false, false), zb(true, false)}},
					{dst: "10.96.1.1:80", proto: tcp, at: -time.Hour, want: "shop/web", td: "PreferSameZone", zones: []zoneAnswer{za(true, false)}},
				}},
				// Ready again, and a new zone appears.
				{at: 90 * time.Second, act: func(f *fixture, at time.Time) {
					f.updateSlice(at, slice("shop", "web-v4-b", "web", discoveryv1.AddressTypeIPv4, ready("z-a"), ready("z-c")))
				}, checks: []svcLookup{
					{dst: "10.96.1.1:80", proto: tcp, at: 89 * time.Second, want: "shop/web", td: "PreferSameZone", zones: []zoneAnswer{za(false, false), zc(false, false)}},
					{dst: "10.96.1.1:80", proto: tcp, at: 91 * time.Second, want: "shop/web", td: "PreferSameZone", zones: []zoneAnswer{za(true, false), zc(true, false)}},
					{dst: "10.96.1.1:80", proto: tcp, at: 45 * time.Second, want: "shop/web", td: "PreferSameZone", zones: []zoneAnswer{za(true, false), zc(false, false)}},
				}},
			},
		},
		{
			name: "topology hints: only ready endpoints count, for the zones they name",
			opts: fixtureOpts{objs: []runtime.Object{
				web(),
				slice("shop", "web-1", "web", discoveryv1.AddressTypeIPv4, ready("z-a", "z-a"), ready("z-b", "z-b", "z-c"), notReady("z-c", "z-c")),
			}},
			steps: []svcStep{
				{checks: []svcLookup{
					{dst: "10.96.1.1:80", proto: tcp, want: "shop/web", zones: []zoneAnswer{za(true, true), zb(true, true), zc(false, true)}},
				}},
				{at: 20 * time.Second, act: func(f *fixture, at time.Time) {
					f.updateSlice(at, slice("shop", "web-1", "web", discoveryv1.AddressTypeIPv4, ready("z-a", "z-a"), ready("z-b", "z-b"), ready("z-c", "z-c")))
				}, checks: []svcLookup{
					{dst: "10.96.1.1:80", proto: tcp, at: 19 * time.Second, want: "shop/web", zones: []zoneAnswer{zc(false, true)}},
					{dst: "10.96.1.1:80", proto: tcp, at: 21 * time.Second, want: "shop/web", zones: []zoneAnswer{zc(true, true)}},
				}},
				// The hints go (the controller stopped hinting).
				{at: 40 * time.Second, act: func(f *fixture, at time.Time) {
					f.updateSlice(at, slice("shop", "web-1", "web", discoveryv1.AddressTypeIPv4, ready("z-a"), ready("z-b"), ready("z-c")))
				}, checks: []svcLookup{
					{dst: "10.96.1.1:80", proto: tcp, at: 39 * time.Second, want: "shop/web", zones: []zoneAnswer{za(true, true), zb(true, true)}},
					{dst: "10.96.1.1:80", proto: tcp, at: 41 * time.Second, want: "shop/web", zones: []zoneAnswer{za(true, false), zb(true, false)}},
				}},
			},
		},
		{
			name: "a Service and its slices created later, dual-stack slices",
			opts: fixtureOpts{},
			steps: []svcStep{
				// The slice may come before its Service.
				{at: 10 * time.Second, act: func(f *fixture, at time.Time) {
					f.createSlice(at, slice("kube-system", "dns-v6", "dns", discoveryv1.AddressTypeIPv6, ready("z-b")))
				}, checks: []svcLookup{
					{dst: "[fd00:96::a]:53", proto: udp, at: 11 * time.Second},
				}},
				{at: 20 * time.Second, act: func(f *fixture, at time.Time) { f.createService(at, dns()) }, checks: []svcLookup{
					{dst: "[fd00:96::a]:53", proto: udp, at: 21 * time.Second, want: "kube-system/dns", zones: []zoneAnswer{zb(true, false), za(false, false)}},
					{dst: "[fd00:96::a]:53", proto: udp, at: 5 * time.Second, want: "kube-system/dns", zones: []zoneAnswer{zb(false, false)}},
				}},
				{at: 30 * time.Second, act: func(f *fixture, at time.Time) {
					f.createSlice(at, slice("kube-system", "dns-v4", "dns", discoveryv1.AddressTypeIPv4, ready("z-a"), ready("z-b")))
				}, checks: []svcLookup{
					{dst: "10.96.0.10:53", proto: udp, at: 29 * time.Second, want: "kube-system/dns", zones: []zoneAnswer{za(false, false), zb(true, false)}},
					{dst: "10.96.0.10:53", proto: udp, at: 31 * time.Second, want: "kube-system/dns", zones: []zoneAnswer{za(true, false), zb(true, false)}},
				}},
				// The IPv6 slice goes; the IPv4 one still has z-b.
				{at: 40 * time.Second, act: func(f *fixture, at time.Time) { f.deleteSlice(at, "kube-system", "dns-v6") }, checks: []svcLookup{
					{dst: "10.96.0.10:53", proto: udp, at: 41 * time.Second, want: "kube-system/dns", zones: []zoneAnswer{za(true, false), zb(true, false)}},
				}},
			},
		},
		{
			name: "a deleted Service answers within the window, then is forgotten",
			opts: fixtureOpts{objs: []runtime.Object{
				web(trafficDistribution(corev1.ServiceTrafficDistributionPreferClose)),
				slice("shop", "web-1", "web", discoveryv1.AddressTypeIPv4, ready("z-a")),
			}},
			steps: []svcStep{
				{at: 100 * time.Second, act: func(f *fixture, at time.Time) {
					f.deleteService(at, "shop", "web")
					f.deleteSlice(at.Add(time.Second), "shop", "web-1")
				}, checks: []svcLookup{
					{dst: "10.96.1.1:80", proto: tcp, at: 99 * time.Second, want: "shop/web", td: "PreferClose", zones: []zoneAnswer{za(true, false)}},
					{dst: "10.96.1.1:80", proto: tcp, at: 100*time.Second + ttl - time.Second, want: "shop/web", td: "PreferClose", zones: []zoneAnswer{za(false, false)}},
					{dst: "10.96.1.1:80", proto: tcp, at: 100*time.Second + ttl + time.Second},
				}},
			},
		},
		{
			name: "a virtual IP reused by another Service",
			opts: fixtureOpts{objs: []runtime.Object{web()}},
			steps: []svcStep{
				{at: 10 * time.Second, act: func(f *fixture, at time.Time) { f.deleteService(at, "shop", "web") }},
				{at: 20 * time.Second, act: func(f *fixture, at time.Time) {
					f.createService(at, service("shop", "api", []string{"10.96.1.1"}, []string{"80"}, trafficDistribution("PreferSameNode")))
				}, checks: []svcLookup{
					{dst: "10.96.1.1:80", proto: tcp, at: 5 * time.Second, want: "shop/web"},
					{dst: "10.96.1.1:80", proto: tcp, at: 15 * time.Second, want: "shop/web"}, // drained late
					{dst: "10.96.1.1:80", proto: tcp, at: 20 * time.Second, want: "shop/api", td: "PreferSameNode"},
					{dst: "10.96.1.1:80", proto: tcp, at: 20*time.Second + ttl, want: "shop/api", td: "PreferSameNode"},
				}},
			},
		},
		{
			name: "a live Service changes ports, traffic distribution, and is recreated",
			opts: fixtureOpts{objs: []runtime.Object{service("shop", "web", []string{"10.96.1.1"}, []string{"80", "8080"})}},
			steps: []svcStep{
				{at: 10 * time.Second, act: func(f *fixture, at time.Time) {
					f.updateService(at, web(trafficDistribution("PreferSameZone")))
				}, checks: []svcLookup{
					{dst: "10.96.1.1:8080", proto: tcp, at: 5 * time.Second, want: "shop/web", td: "PreferSameZone"},
					{dst: "10.96.1.1:8080", proto: tcp, at: 10*time.Second + ttl - time.Second, want: "shop/web", td: "PreferSameZone"},
					{dst: "10.96.1.1:8080", proto: tcp, at: 10*time.Second + ttl + time.Second},
					{dst: "10.96.1.1:80", proto: tcp, at: 11 * time.Second, want: "shop/web", td: "PreferSameZone"},
				}},
				// Deleted and created again (new UID and address) in one update.
				{at: 20 * time.Second, act: func(f *fixture, at time.Time) {
					f.updateService(at, service("shop", "web", []string{"10.96.1.2"}, []string{"80"}, svcUID("second")))
				}, checks: []svcLookup{
					{dst: "10.96.1.1:80", proto: tcp, at: 15 * time.Second, want: "shop/web", td: "PreferSameZone"},
					{dst: "10.96.1.1:80", proto: tcp, at: 20*time.Second + ttl + time.Second},
					{dst: "10.96.1.2:80", proto: tcp, at: 21 * time.Second, want: "shop/web"},
				}},
			},
		},
		{
			name: "headless and ExternalName Services have no virtual IP",
			opts: fixtureOpts{objs: []runtime.Object{
				service("shop", "db", []string{corev1.ClusterIPNone}, []string{"5432"}),
				func() *corev1.Service {
					s := service("shop", "ext", nil, []string{"443"})
					s.Spec.Type, s.Spec.ExternalName = corev1.ServiceTypeExternalName, "example.com"
					return s
				}(),
				slice("shop", "db-1", "db", discoveryv1.AddressTypeIPv4, ready("z-a")),
			}},
			steps: []svcStep{{checks: []svcLookup{
				{dst: "0.0.0.0:5432", proto: tcp},
				{dst: "[::]:443", proto: tcp},
			}}},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, c.opts)
			for _, s := range c.steps {
				if s.act != nil {
					s.act(f, base.Add(s.at))
				}
				for _, ck := range s.checks {
					checkService(t, f.r, ck)
				}
			}
			if c.name == "headless and ExternalName Services have no virtual IP" {
				f.r.svc.mu.RLock()
				n := len(f.r.svc.vips)
				f.r.svc.mu.RUnlock()
				if n != 0 {
					t.Errorf("%d virtual IPs indexed, want none", n)
				}
			}
		})
	}
}

func checkService(t *testing.T, r *Resolver, ck svcLookup) {
	t.Helper()
	at := base.Add(ck.at)
	got := r.Service(netip.MustParseAddrPort(ck.dst), ck.proto, at)
	name, td := "", ""
	if got != nil {
		name, td = got.Namespace+"/"+got.Name, got.TrafficDistribution
	}
	if name != ck.want || td != ck.td {
		t.Errorf("Service(%s, %d) at %s = %q (%q), want %q (%q)", ck.dst, ck.proto, ck.at, name, td, ck.want, ck.td)
		return
	}
	for _, z := range ck.zones {
		ready, hinted := r.ReadyInZone(got, z.zone, at)
		if ready != z.ready || hinted != z.hinted {
			t.Errorf("%s ReadyInZone(%q) at %s = ready %v, hinted %v; want %v, %v", name, z.zone, ck.at, ready, hinted, z.ready, z.hinted)
		}
	}
}

// TestServiceForgotten: once the window has passed, a deleted Service and
// its released virtual IPs are no longer held in memory.
func TestServiceForgotten(t *testing.T) {
	f := newFixture(t, fixtureOpts{objs: []runtime.Object{
		service("shop", "web", []string{"10.96.1.1", "fd00:96::1"}, []string{"80", "443"}),
		slice("shop", "web-1", "web", discoveryv1.AddressTypeIPv4, ready("z-a")),
	}})
	f.deleteService(base.Add(10*time.Second), "shop", "web")
	f.deleteSlice(base.Add(11*time.Second), "shop", "web-1")
	sizes := func() (vips, states, released, deleted int) {
		f.r.svc.mu.RLock()
		defer f.r.svc.mu.RUnlock()
		return len(f.r.svc.vips), len(f.r.svc.byName), len(f.r.svc.released), len(f.r.svc.deleted)
	}
	if v, s, r, d := sizes(); v != 4 || s != 1 || r != 4 || d != 1 {
		t.Errorf("within the window: %d virtual IPs, %d states, %d released, %d deleted; want 4, 1, 4, 1", v, s, r, d)
	}
	if st := f.r.Stats(); st.Services != 0 || st.ServiceVIPs != 4 {
		t.Errorf("Stats within the window: %d Services, %d virtual IPs; want 0, 4", st.Services, st.ServiceVIPs)
	}
	// Any later event expires what the window no longer covers.
	f.createService(base.Add(10*time.Second+ttl+time.Second), service("shop", "api", []string{"10.96.1.2"}, []string{"80"}))
	if v, s, r, d := sizes(); v != 1 || s != 1 || r != 0 || d != 0 {
		t.Errorf("after the window: %d virtual IPs, %d states, %d released, %d deleted; want 1, 1, 0, 0", v, s, r, d)
	}
	if st := f.r.Stats(); st.Services != 1 || st.ServiceVIPs != 1 {
		t.Errorf("Stats: %d Services, %d virtual IPs; want 1, 1", st.Services, st.ServiceVIPs)
	}
}

// TestServiceBounds: deleted Services and released virtual IPs beyond the
// count bounds are forgotten oldest first, however short the time.
func TestServiceBounds(t *testing.T) {
	tab := newServiceTable(time.Hour, 0)
	tab.maxReleased, tab.maxDeleted = 2, 1
	now := base.UnixNano()
	for i := range 3 {
		s := service("shop", fmt.Sprintf("s%d", i), []string{fmt.Sprintf("10.96.1.%d", i)}, []string{"80"})
		tab.upsertService(s, now, false)
		tab.deleteService(s.Namespace, s.Name, s.UID, now+int64(i+1))
	}
	if len(tab.released) != 2 || len(tab.deleted) != 1 || len(tab.vips) != 2 {
		t.Errorf("%d released, %d deleted, %d virtual IPs; want 2, 1, 2", len(tab.released), len(tab.deleted), len(tab.vips))
	}
	if tab.lookup(netip.MustParseAddrPort("10.96.1.0:80"), protoTCP, now) != nil {
		t.Error("the oldest released virtual IP still answers")
	}
	if tab.lookup(netip.MustParseAddrPort("10.96.1.2:80"), protoTCP, now) == nil {
		t.Error("the newest released virtual IP does not answer")
	}
}

// TestZoneHistory: the history of one zone answers for every time the
// window covers, keeps at most maxZoneTransitions, and lets the oldest
// kept state answer for all earlier times.
func TestZoneHistory(t *testing.T) {
	// Ready from 10 to 20, not from 20 to 30, and so on.
	readyAt := func(x int64) int32 { return int32((x / 10) % 2) }
	for _, window := range []int64{100, 1 << 40} {
		h := &zoneHistory{last: transition{at: heldSinceStart}}
		const changes = 2 * maxZoneTransitions
		for i := int64(1); i <= changes; i++ {
			h.set(i*10, counts{ready: readyAt(i * 10)}, i*10-window)
			if h.len() > maxZoneTransitions {
				t.Fatalf("window %d, after %d changes: %d transitions kept", window, i, h.len())
			}
		}
		if h.nth(0).at != heldSinceStart {
			t.Errorf("window %d: oldest transition at %d, want heldSinceStart", window, h.nth(0).at)
		}
		last := int64(changes * 10)
		oldest := max(last-window, last-(maxZoneTransitions-1)*10)
		for x := oldest; x <= last+5; x++ {
			if got := h.at(x).ready; got != readyAt(x) {
				t.Fatalf("window %d: at %d ready %d, want %d", window, x, got, readyAt(x))
			}
		}
		if got := h.at(math.MinInt64 + 1).ready; got != h.nth(0).ready {
			t.Errorf("window %d: before every transition: ready %d, want the oldest kept %d", window, got, h.nth(0).ready)
		}
		// The same time twice: the later event wins, no new transition.
		n := h.len()
		h.set(last, counts{ready: 5}, last-window)
		if h.len() != n || h.at(last).ready != 5 {
			t.Errorf("window %d, same-time change: %d transitions (want %d), ready %d (want 5)", window, h.len(), n, h.at(last).ready)
		}
	}
}

// TestServicesForbidden: without permission to list Services the resolver
// still syncs, and knows no virtual IP.
func TestServicesForbidden(t *testing.T) {
	f := newFixture(t, fixtureOpts{forbidServices: true, objs: []runtime.Object{web80()}})
	if svc := f.r.Service(netip.MustParseAddrPort("10.96.1.1:80"), protoTCP, base); svc != nil {
		t.Errorf("%+v found without permission to list Services", svc)
	}
	for _, svc := range []*Service{nil, {Namespace: "shop", Name: "web"}} {
		if r, h := f.r.ReadyInZone(svc, "z-a", base); r || h {
			t.Errorf("ReadyInZone(%+v) = %v, %v for a Service the resolver did not hand out", svc, r, h)
		}
	}
}

func web80() *corev1.Service { return service("shop", "web", []string{"10.96.1.1"}, []string{"80"}) }

// TestServiceTransforms: the transforms keep what the index reads and
// nothing else, and are idempotent as client-go requires.
func TestServiceTransforms(t *testing.T) {
	s := service("shop", "web", []string{"10.96.1.1", "fd00:96::1"}, []string{"80", "53/UDP"}, trafficDistribution("PreferSameZone"))
	s.ResourceVersion = "7"
	s.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}
	got, err := serviceTransform(s)
	if err != nil {
		t.Fatal(err)
	}
	gs := got.(*corev1.Service)
	if len(gs.Annotations) != 0 || gs.ManagedFields != nil || gs.Spec.Selector != nil || gs.Spec.Ports[0].Name != "" {
		t.Errorf("service transform kept annotations, managed fields, selector or port names: %+v", gs)
	}
	if !reflect.DeepEqual(serviceVIPs(gs), serviceVIPs(s)) || *gs.Spec.TrafficDistribution != "PreferSameZone" || gs.ResourceVersion != "7" {
		t.Errorf("service transform lost what the index reads: %+v", gs)
	}
	again, _ := serviceTransform(gs)
	if !reflect.DeepEqual(again, gs) {
		t.Error("service transform is not idempotent")
	}

	es := slice("shop", "web-1", "web", discoveryv1.AddressTypeIPv4, ready("z-a", "z-b"), notReady("z-b"))
	got, err = endpointSliceTransform(es)
	if err != nil {
		t.Fatal(err)
	}
	ge := got.(*discoveryv1.EndpointSlice)
	if len(ge.Labels) != 1 || ge.Ports != nil || ge.Endpoints[0].Addresses != nil || ge.Endpoints[0].TargetRef != nil || ge.Endpoints[0].NodeName != nil {
		t.Errorf("endpointslice transform kept labels, ports, addresses, target or node: %+v", ge)
	}
	if !reflect.DeepEqual(sliceCounts(ge), sliceCounts(es)) {
		t.Errorf("endpointslice transform changed the counts: %v, want %v", sliceCounts(ge), sliceCounts(es))
	}
	again, _ = endpointSliceTransform(ge)
	if !reflect.DeepEqual(again, ge) {
		t.Error("endpointslice transform is not idempotent")
	}
	if out, _ := serviceTransform("tombstone"); out != "tombstone" {
		t.Error("service transform changed a non-Service")
	}
}

// TestServiceConcurrent: lookups run while the informers change the
// Service and its endpoints (run with -race).
func TestServiceConcurrent(t *testing.T) {
	f := newFixture(t, fixtureOpts{objs: []runtime.Object{
		web80(),
		slice("shop", "web-1", "web", discoveryv1.AddressTypeIPv4, ready("z-a", "z-a")),
	}})
	dst := netip.MustParseAddrPort("10.96.1.1:80")
	stop := inBackground(func(int) int {
		now := f.clock()
		if svc := f.r.Service(dst, protoTCP, now); svc != nil {
			f.r.ReadyInZone(svc, "z-a", now)
			return 1
		}
		return 0
	})
	for i := 1; i <= 20; i++ {
		at := base.Add(time.Duration(i) * time.Second)
		e := ready("z-a", "z-a")
		if i%2 == 1 {
			e = notReady("z-a")
		}
		f.updateSlice(at, slice("shop", "web-1", "web", discoveryv1.AddressTypeIPv4, e))
		f.updateService(at, service("shop", "web", []string{"10.96.1.1"}, []string{"80", fmt.Sprint(8000 + i)}))
	}
	if stop() == 0 {
		t.Error("no lookup succeeded")
	}
	// The last maxZoneTransitions states are remembered.
	svc := f.r.Service(dst, protoTCP, base.Add(20*time.Second))
	for i := 20 - maxZoneTransitions + 1; i <= 20; i++ {
		at := base.Add(time.Duration(i)*time.Second + time.Millisecond)
		if ready, hinted := f.r.ReadyInZone(svc, "z-a", at); ready != (i%2 == 0) || hinted != ready {
			t.Errorf("at %ds: ready %v, hinted %v; want %v", i, ready, hinted, i%2 == 0)
		}
	}
}

// TestServicePointer: the resolver hands out one pointer per Service,
// kept while nothing it carries changes and replaced, never modified,
// when the traffic distribution changes, so consumers may key by it.
func TestServicePointer(t *testing.T) {
	f := newFixture(t, fixtureOpts{objs: []runtime.Object{web80()}})
	dst := netip.MustParseAddrPort("10.96.1.1:80")
	first := f.r.Service(dst, protoTCP, base)
	f.updateService(base.Add(10*time.Second), service("shop", "web", []string{"10.96.1.1"}, []string{"80", "443"}))
	if got := f.r.Service(dst, protoTCP, base.Add(11*time.Second)); got != first {
		t.Errorf("a new port gave a new pointer: %p, want %p", got, first)
	}
	if got := f.r.Service(netip.MustParseAddrPort("10.96.1.1:443"), protoTCP, base.Add(11*time.Second)); got != first {
		t.Errorf("the new port's Service is %p, want %p", got, first)
	}
	f.updateService(base.Add(20*time.Second), service("shop", "web", []string{"10.96.1.1"}, []string{"80"}, trafficDistribution("PreferSameZone")))
	second := f.r.Service(dst, protoTCP, base.Add(21*time.Second))
	if second == first || second.TrafficDistribution != "PreferSameZone" {
		t.Errorf("after the traffic distribution changed: %p %+v, want a new pointer with PreferSameZone", second, second)
	}
	if first.TrafficDistribution != "" {
		t.Errorf("the former pointer was modified: %+v", first)
	}
}
