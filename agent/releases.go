package agent

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// maxHostRoutes bounds the host routes followed: far more than the pods
// a node runs (Kubernetes allows 110 by default, large nodes a few
// hundred), so only a node whose routing table holds other /32s in its
// pod ranges could reach it. Beyond it, new routes are not followed and
// their releases not reported.
const maxHostRoutes = 1 << 16

// hostRoutes follows the device host routes of this node's pod addresses,
// address -> interface index, to tell when a pod releases its address:
// its route is deleted, the link it went through is deleted (the pod's
// veth, when its sandbox goes), or the route moves to another interface
// (a new pod got the address without the old route's deletion being
// seen). Pods of CNIs that give them no host route (bridge CNIs, eBPF
// dataplanes routing without one) are not seen: their releases are not
// reported, and the server keeps its informer's view for them.
type hostRoutes struct {
	byAddr map[netip.Addr]int32
	// full counts the routes not followed because the table was full.
	full int
}

func newHostRoutes() *hostRoutes { return &hostRoutes{byAddr: map[netip.Addr]int32{}} }

// apply updates the table with ev and appends to rel the addresses whose
// pod went away. local says which addresses are this node's pods'.
func (h *hostRoutes) apply(ev routeEvent, local func(netip.Addr) bool, rel []netip.Addr) []netip.Addr {
	switch ev.kind {
	case routeAdded:
		if !local(ev.addr) {
			return rel
		}
		prev, ok := h.byAddr[ev.addr]
		if ok && prev != ev.index {
			rel = append(rel, ev.addr)
		}
		if !ok && len(h.byAddr) >= maxHostRoutes {
			h.full++
			return rel
		}
		h.byAddr[ev.addr] = ev.index
	case routeDeleted:
		if _, ok := h.byAddr[ev.addr]; ok {
			delete(h.byAddr, ev.addr)
			rel = append(rel, ev.addr)
		}
	case linkDeleted:
		for a, index := range h.byAddr {
			if index == ev.index {
				delete(h.byAddr, a)
				rel = append(rel, a)
			}
		}
	}
	return rel
}

// resync rebuilds the table from a dump of the routes (routeAdded events),
// after notifications were lost: an address gone from the dump, or
// through another interface now, was released meanwhile.
func (h *hostRoutes) resync(dump []routeEvent, local func(netip.Addr) bool, rel []netip.Addr) []netip.Addr {
	old := h.byAddr
	h.byAddr = make(map[netip.Addr]int32, len(old))
	for _, ev := range dump {
		rel = h.apply(ev, local, rel)
	}
	for a, index := range old {
		if now, ok := h.byAddr[a]; !ok || now != index {
			rel = append(rel, a)
		}
	}
	return rel
}

// routeUpdate is what the route reader passes to the agent's loop: events
// read, or the news that some were lost.
type routeUpdate struct {
	events []routeEvent
	lost   bool
}

// watchRoutes subscribes to the route and link changes of the network
// namespace at path and returns the table of its host routes now and a
// channel of the changes, read until ctx ends. Errors other than lost
// notifications end the channel after logging through warn.
func watchRoutes(ctx context.Context, path string, local func(netip.Addr) bool, warn func(msg string, err error)) (*hostRoutes, <-chan routeUpdate, error) {
	ev, err := openRouteEvents(path)
	if err != nil {
		return nil, nil, err
	}
	// Subscribed first, then listed: a change in between is both in the
	// dump and in the notifications, which apply idempotently.
	dump, err := dumpHostRoutes(path)
	if err != nil {
		ev.Close()
		return nil, nil, err
	}
	h := newHostRoutes()
	h.resync(dump, local, nil)
	out := make(chan routeUpdate, 64)
	go func() {
		<-ctx.Done()
		ev.Close()
	}()
	go func() {
		defer close(out)
		for {
			events, err := ev.read()
			u := routeUpdate{events: events, lost: errors.Is(err, errEventsLost)}
			if err != nil && !u.lost {
				if ctx.Err() == nil && !errors.Is(err, os.ErrClosed) {
					warn("reading route changes: pod address releases are no longer reported", err)
				}
				return
			}
			if len(u.events) == 0 && !u.lost {
				continue
			}
			select {
			case out <- u:
			case <-ctx.Done():
				return
			}
		}
	}()
	return h, out, nil
}

// releases turns released addresses into the wire's form, seen at t.
func releases(addrs []netip.Addr, t time.Time) []wire.Release {
	out := make([]wire.Release, len(addrs))
	for i, a := range addrs {
		out[i] = wire.Release{Addr: a, Time: t}
	}
	return out
}
