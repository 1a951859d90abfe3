//go:build linux

package agent

import (
	"net/http"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// TestHostRoutes: which route changes release which addresses, and a
// resync after lost notifications.
func TestHostRoutes(t *testing.T) {
	a := netip.MustParseAddr
	local := func(x netip.Addr) bool {
		return netip.MustParsePrefix("10.0.0.0/24").Contains(x) || netip.MustParsePrefix("fd00::/64").Contains(x)
	}
	added := func(addr string, index int32) routeEvent {
		return routeEvent{kind: routeAdded, addr: a(addr), index: index}
	}
	for _, tc := range []struct {
		name   string
		events []routeEvent
		want   []string // released, in order
	}{
		{"route deleted", []routeEvent{added("10.0.0.5", 7), {kind: routeDeleted, addr: a("10.0.0.5")}}, []string{"10.0.0.5"}},
		{"link deleted", []routeEvent{added("10.0.0.5", 7), added("fd00::5", 7), added("10.0.0.6", 8), {kind: linkDeleted, index: 7}}, []string{"10.0.0.5", "fd00::5"}},
		{"route moved to another link", []routeEvent{added("10.0.0.5", 7), added("10.0.0.5", 9)}, []string{"10.0.0.5"}},
		{"route added again on its link", []routeEvent{added("10.0.0.5", 7), added("10.0.0.5", 7)}, nil},
		{"not a local address", []routeEvent{added("10.9.9.9", 7), {kind: routeDeleted, addr: a("10.9.9.9")}, {kind: linkDeleted, index: 7}}, nil},
		{"deleted twice", []routeEvent{added("10.0.0.5", 7), {kind: routeDeleted, addr: a("10.0.0.5")}, {kind: linkDeleted, index: 7}}, []string{"10.0.0.5"}},
		{"never seen", []routeEvent{{kind: routeDeleted, addr: a("10.0.0.5")}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHostRoutes()
			var rel []netip.Addr
			for _, ev := range tc.events {
				rel = h.apply(ev, local, rel)
			}
			got := make([]string, 0, len(rel))
			for _, r := range rel {
				got = append(got, r.String())
			}
			slices.Sort(got)
			want := slices.Clone(tc.want)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("released %v, want %v", got, want)
			}
		})
	}
	t.Run("resync", func(t *testing.T) {
		h := newHostRoutes()
		h.resync([]routeEvent{added("10.0.0.5", 7), added("10.0.0.6", 8), added("10.0.0.7", 9)}, local, nil)
		// Meanwhile, unseen: .5 gone, .6 moved to link 10, .8 added.
		rel := h.resync([]routeEvent{added("10.0.0.6", 10), added("10.0.0.7", 9), added("10.0.0.8", 11)}, local, nil)
		slices.SortFunc(rel, netip.Addr.Compare)
		if want := []netip.Addr{a("10.0.0.5"), a("10.0.0.6")}; !slices.Equal(rel, want) {
			t.Errorf("released %v, want %v", rel, want)
		}
		if len(h.byAddr) != 3 || h.byAddr[a("10.0.0.8")] != 11 {
			t.Errorf("table after resync: %v", h.byAddr)
		}
	})
}

// TestBufferSeal: a seal puts what was drained before a release in a
// part of its own, taken before the rest; a second release before the
// first part went out merges the two and counts the releases whose
// address has flows drained in between; the bound covers both parts.
func TestBufferSeal(t *testing.T) {
	rec := func(src string, bytes uint64) flow.Record {
		return flow.Record{Key: flow.Key{Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr("10.1.0.1"), Proto: 6, Port: 80, PortIsDst: true},
			Counts: flow.Counts{Bytes: bytes, Packets: 1}}
	}
	rel := func(addr string) []wire.Release {
		return []wire.Release{{Addr: netip.MustParseAddr(addr), Time: time.UnixMilli(1000)}}
	}
	b := newBuffer(3)
	b.add([]flow.Record{rec("10.0.0.5", 100)})
	if n := b.seal(rel("10.0.0.5"), time.UnixMilli(1001)); n != 0 {
		t.Errorf("first seal: %d unordered", n)
	}
	b.add([]flow.Record{rec("10.0.0.5", 7), rec("10.0.0.6", 1)})
	if dropped := b.add([]flow.Record{rec("10.0.0.7", 9)}); dropped.Bytes != 9 {
		t.Errorf("beyond the bound (sealed part included): dropped %+v, want 9 bytes", dropped)
	}
	if b.len() != 3 {
		t.Errorf("len %d, want 3", b.len())
	}
	flows, rels, at, ok := b.takeSealed()
	if !ok || len(flows) != 1 || flows[0].Bytes != 100 || len(rels) != 1 || at.UnixMilli() != 1001 {
		t.Fatalf("sealed part: %v %v %v %v", flows, rels, at, ok)
	}
	if _, _, _, ok := b.takeSealed(); ok || b.hasSealed() {
		t.Error("sealed part taken twice")
	}
	if rest := b.take(nil); len(rest) != 2 {
		t.Errorf("rest: %v", rest)
	}

	// Two releases before the first part went out.
	b.add([]flow.Record{rec("10.0.0.5", 100)})
	b.seal(rel("10.0.0.5"), time.UnixMilli(2000))
	b.add([]flow.Record{rec("10.0.0.5", 50), rec("10.0.0.6", 1)})
	if n := b.seal(rel("10.0.0.6"), time.UnixMilli(2001)); n != 1 {
		t.Errorf("second seal: %d unordered, want 1 (10.0.0.5 has flows after its release)", n)
	}
	flows, rels, at, _ = b.takeSealed()
	var sum uint64
	for _, f := range flows {
		sum += f.Bytes
	}
	if len(flows) != 2 || sum != 151 || len(rels) != 2 || at.UnixMilli() != 2001 {
		t.Errorf("merged part: %v %v %v", flows, rels, at)
	}
}

// TestReleaseSealsItsBatch runs the agent with a real datapath and the
// host routes of its namespace followed. A pod's veth is deleted (IPv4
// removes the route through it without telling, IPv6 tells), another
// pod's route is deleted on its own: each release is sent at once, with
// a flush interval of an hour, and the batches split the address's
// traffic at its release. Routes outside the pod ranges, or not host
// routes, release nothing.
func TestReleaseSealsItsBatch(t *testing.T) {
	rcv := newReceiver(t, nil)
	cfg := testConfig(rcv.srv.URL)
	cfg.FlushInterval = time.Hour
	cfg.ReportReleases = true
	cfg.LocalPrefixes = append(cfg.LocalPrefixes, netip.MustParsePrefix("fd00::/64"))
	// The routes exist before the agent starts (listed) or are added
	// after (notified): both are followed.
	ra := startAgentWith(t, cfg, func(ns string) {
		ipIn(t, ns, "link", "add", "p5", "type", "veth", "peer", "name", "p5x")
		ipIn(t, ns, "link", "set", "p5", "up")
		ipIn(t, ns, "route", "add", "10.0.0.5/32", "dev", "p5")
		ipIn(t, ns, "-6", "route", "add", "fd00::5/128", "dev", "p5")
		ipIn(t, ns, "route", "add", "10.9.9.9/32", "dev", "p5")
		ipIn(t, ns, "route", "add", "10.0.0.128/25", "dev", "p5")
	})
	ns := ra.inj.ns
	waitFor(t, "the agent following routes", func() bool {
		return ra.logs.String() != "" && strings.Contains(ra.logs.String(), "following pod host routes")
	})
	ipIn(t, ns, "link", "add", "p6", "type", "veth", "peer", "name", "p6x")
	ipIn(t, ns, "link", "set", "p6", "up")
	ipIn(t, ns, "route", "add", "10.0.0.6/32", "dev", "p6")

	before := ra.inject(t, "10.0.0.5", "10.1.0.1", 80, 100, 3)
	ipIn(t, ns, "link", "del", "p5")
	releasedIn := func(addr string) int {
		rcv.mu.Lock()
		defer rcv.mu.Unlock()
		return releaseBatch(rcv.batches, addr)
	}
	waitFor(t, "the releases of the deleted veth", func() bool { return releasedIn("10.0.0.5") >= 0 && releasedIn("fd00::5") >= 0 })
	after := ra.inject(t, "10.0.0.5", "10.1.0.1", 80, 100, 2)
	time.Sleep(200 * time.Millisecond) // a notification the agent must not act on would come now
	ipIn(t, ns, "route", "del", "10.0.0.6/32", "dev", "p6")
	waitFor(t, "the release of the deleted route", func() bool { return releasedIn("10.0.0.6") >= 0 })
	if err := ra.stop(); err != nil {
		t.Fatal(err)
	}

	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	cut := releaseBatch(rcv.batches, "10.0.0.5")
	var upTo, later flow.Counts
	var all []string
	for i, b := range rcv.batches {
		for _, f := range b.Flows {
			if f.Src != netip.MustParseAddr("10.0.0.5") {
				continue
			}
			if i <= cut {
				upTo.Add(f.Counts)
			} else {
				later.Add(f.Counts)
			}
		}
		for _, r := range b.Released {
			all = append(all, r.Addr.String())
			if r.Time.After(b.Time) {
				t.Errorf("batch %d: release of %s at %v, after the batch's time %v", b.Seq, r.Addr, r.Time, b.Time)
			}
		}
		if i > 0 && !b.Time.After(rcv.batches[i-1].Time) {
			t.Errorf("batch %d at %v, not after batch %d at %v", b.Seq, b.Time, rcv.batches[i-1].Seq, rcv.batches[i-1].Time)
		}
	}
	if upTo != before || later != after {
		t.Errorf("10.0.0.5's traffic: %+v up to the batch of its release, %+v after; want %+v and %+v", upTo, later, before, after)
	}
	slices.Sort(all)
	if want := []string{"10.0.0.5", "10.0.0.6", "fd00::5"}; !slices.Equal(all, want) {
		t.Errorf("released %v, want %v (each once; none outside the pod ranges or of a /25)", all, want)
	}
	if v := metricValue(t, ra.Agent, "kubezonnet_agent_address_releases_total", ""); v != 3 {
		t.Errorf("kubezonnet_agent_address_releases_total = %v, want 3", v)
	}
}

// releaseBatch is the index of the batch that reported addr's release, -1
// for none.
func releaseBatch(batches []wire.Batch, addr string) int {
	for i, b := range batches {
		if slices.ContainsFunc(b.Released, func(r wire.Release) bool { return r.Addr == netip.MustParseAddr(addr) }) {
			return i
		}
	}
	return -1
}

// twoPods gives the namespace two pods' veths, p5 and p6, with host routes
// to 10.0.0.5 and 10.0.0.6.
func twoPods(t *testing.T) func(ns string) {
	return func(ns string) {
		for _, p := range []string{"p5", "p6"} {
			ipIn(t, ns, "link", "add", p, "type", "veth", "peer", "name", p+"x")
			ipIn(t, ns, "link", "set", p, "up")
		}
		ipIn(t, ns, "route", "add", "10.0.0.5/32", "dev", "p5")
		ipIn(t, ns, "route", "add", "10.0.0.6/32", "dev", "p6")
	}
}

// ipIn runs ip(8) in the network namespace ns.
func ipIn(t *testing.T, ns string, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("ip -n %s %s: %v: %s", ns, strings.Join(args, " "), err, out)
	}
}

// TestReleaseNotice: a release seen while a batch is in flight (the
// server refuses it for now) is sent ahead as a notice naming the batch
// that will carry it, which follows once the first is accepted.
func TestReleaseNotice(t *testing.T) {
	var blocked atomic.Bool
	blocked.Store(true)
	rcv := newReceiver(t, func(int) (int, bool) {
		if blocked.Load() {
			return http.StatusServiceUnavailable, false
		}
		return http.StatusNoContent, true
	})
	cfg := testConfig(rcv.srv.URL)
	cfg.FlushInterval = time.Hour
	cfg.ReportReleases = true
	ra := startAgentWith(t, cfg, twoPods(t))
	ns := ra.inj.ns
	ipIn(t, ns, "route", "del", "10.0.0.5/32", "dev", "p5")
	waitFor(t, "the batch of the first release refused", func() bool {
		rcv.mu.Lock()
		defer rcv.mu.Unlock()
		return rcv.requests >= 1
	})
	ipIn(t, ns, "route", "del", "10.0.0.6/32", "dev", "p6")
	waitFor(t, "the notice of the second release", func() bool {
		rcv.mu.Lock()
		defer rcv.mu.Unlock()
		return len(rcv.notices) >= 1
	})
	blocked.Store(false)
	waitFor(t, "both batches", func() bool {
		rcv.mu.Lock()
		defer rcv.mu.Unlock()
		return len(rcv.batches) >= 2
	})
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	n, carrier := rcv.notices[0], rcv.batches[1]
	if len(n.Released) != 1 || n.Released[0].Addr != netip.MustParseAddr("10.0.0.6") {
		t.Fatalf("notice reports %v, want 10.0.0.6", n.Released)
	}
	if n.Seq != carrier.Seq || !n.Time.Equal(carrier.Time) || n.Incarnation != carrier.Incarnation {
		t.Errorf("notice names batch %d at %v, the release came in batch %d at %v", n.Seq, n.Time, carrier.Seq, carrier.Time)
	}
	if len(carrier.Released) != 1 || carrier.Released[0].Addr != n.Released[0].Addr || !carrier.Released[0].Time.Equal(n.Released[0].Time) {
		t.Errorf("the carrying batch reports %v, the notice %v", carrier.Released, n.Released)
	}
	if first := rcv.batches[0]; len(first.Released) != 1 || first.Released[0].Addr != netip.MustParseAddr("10.0.0.5") {
		t.Errorf("first batch reports %v, want 10.0.0.5", first.Released)
	}
	if v := metricValue(t, ra.Agent, "kubezonnet_agent_release_notices_total", ""); v != 1 {
		t.Errorf("kubezonnet_agent_release_notices_total = %v, want 1", v)
	}
}

// TestShutdownCountsSealedPart: at shutdown, with the server refusing
// every batch, the undelivered bytes reported include a part sealed at a
// release behind the batch in flight.
func TestShutdownCountsSealedPart(t *testing.T) {
	rcv := newReceiver(t, func(int) (int, bool) { return http.StatusServiceUnavailable, false })
	cfg := testConfig(rcv.srv.URL)
	cfg.FlushInterval = time.Hour
	cfg.ReportReleases = true
	cfg.ShutdownTimeout = time.Second
	ra := startAgentWith(t, cfg, twoPods(t))
	ns := ra.inj.ns
	ra.inject(t, "10.0.0.5", "10.1.0.1", 80, 100, 3)
	ipIn(t, ns, "route", "del", "10.0.0.5/32", "dev", "p5")
	waitFor(t, "the first release's batch in flight", func() bool {
		rcv.mu.Lock()
		defer rcv.mu.Unlock()
		return rcv.requests >= 1
	})
	ra.inject(t, "10.0.0.6", "10.1.0.1", 80, 100, 2)
	ipIn(t, ns, "route", "del", "10.0.0.6/32", "dev", "p6")
	waitFor(t, "the second release sealed", func() bool {
		return metricValue(t, ra.Agent, "kubezonnet_agent_address_releases_total", "") == 2
	})
	err := ra.stop()
	if err == nil || !strings.Contains(err.Error(), "500 bytes not delivered") {
		t.Fatalf("shutdown: %v, want 500 bytes not delivered (300 in flight, 200 sealed behind)", err)
	}
}
