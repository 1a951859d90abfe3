package server

import (
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// fakeResolver stands in for resolve.Resolver, which needs Kubernetes
// informers: it answers from a table of addresses. Ingest only depends on
// the Resolver interface, and the resolver's own tests cover resolution.
type fakeResolver struct {
	eps      map[netip.Addr]*resolve.Endpoint
	unsynced atomic.Bool
}

var fakeUnknown = &resolve.Endpoint{Kind: resolve.KindUnknown, Workload: "unknown", WorkloadKind: "Unknown",
	Zone: "unknown", Region: "unknown", Reason: resolve.ReasonNoPod}

func (f *fakeResolver) Resolve(ip netip.Addr, _ time.Time) *resolve.Endpoint {
	if ep, ok := f.eps[ip]; ok {
		return ep
	}
	return fakeUnknown
}

func (f *fakeResolver) HasSynced() bool { return !f.unsynced.Load() }

// Lookup returns the registered endpoint (whose node owns the address);
// no address awaits a holder here.
func (f *fakeResolver) Lookup(ip netip.Addr, at time.Time, _ string) (*resolve.Endpoint, bool) {
	return f.Resolve(ip, at), false
}

// Released records nothing: the real resolver's tests cover releases.
func (f *fakeResolver) Released(netip.Addr, string, time.Time, time.Time) bool { return false }

// Service knows no Service: the ingest tests of Services run on the real
// resolver (realresolver_test.go).
func (f *fakeResolver) Service(netip.AddrPort, uint8, time.Time) *resolve.Service { return nil }

// ReadyInZone has no endpoints to report.
func (f *fakeResolver) ReadyInZone(*resolve.Service, string, time.Time) (ready, hinted bool) {
	return false, false
}

// add registers a pod endpoint at ip on its node.
func (f *fakeResolver) add(ip string, ep *resolve.Endpoint) {
	a := netip.MustParseAddr(ip)
	f.eps[a] = ep
}

func newFakeResolver() *fakeResolver {
	return &fakeResolver{eps: map[netip.Addr]*resolve.Endpoint{}}
}

func podEP(ns, pod, workload, kind, node, zone string) *resolve.Endpoint {
	return &resolve.Endpoint{Kind: resolve.KindPod, Namespace: ns, Pod: pod, Workload: workload,
		WorkloadKind: kind, Node: node, Zone: zone, Region: "r1"}
}
