//go:build linux

package bpf

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// twoNodes builds node a (pods a1, a2) and node b (pod b1), removed when
// the test ends, pass or fail.
func twoNodes(t *testing.T, offloads bool) *testnet.Topology {
	t.Helper()
	return testnet.BuildT(t, testnet.Spec{
		Offloads: offloads,
		Nodes: []testnet.NodeSpec{
			{Name: "a", Zone: "zone-a", Pods: []string{"a1", "a2"}},
			{Name: "b", Zone: "zone-b", Pods: []string{"b1"}},
		},
	})
}

// attachNode loads a datapath for one node, as the node's agent would.
func attachNode(t *testing.T, n *testnet.Node, cfg Config) *Datapath {
	t.Helper()
	d, err := Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	if err := d.SetLocalPrefixes(n.LocalPrefixes()); err != nil {
		t.Fatal(err)
	}
	if err := d.AttachNetfilter(n.NSPath(), DefaultNetfilterPriority); err != nil {
		t.Fatal(err)
	}
	return d
}

// sendTCP sends n bytes over a fresh TCP connection from fromNS to dst,
// where a listener in dstNS reads everything, and waits for the connection
// to be fully closed on both sides.
func sendTCP(t *testing.T, fromNS, dstNS string, dst netip.AddrPort, n int) {
	t.Helper()
	sendTCPVia(t, fromNS, dstNS, dst, dst, n)
}

// sendTCPVia is sendTCP connecting to dial, which the network delivers
// (DNATs) to the listener at dst.
func sendTCPVia(t *testing.T, fromNS, dstNS string, dial, dst netip.AddrPort, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	mss := 1448
	if dst.Addr().Is6() {
		mss = 1428
	}
	if err := testnet.TransferVia(ctx, fromNS, dstNS, dial, dst, n, 45*mss); err != nil {
		t.Fatal(err)
	}
	if err := testnet.WaitNoLastACK(ctx, dstNS); err != nil {
		t.Fatal(err)
	}
}

// sendUDP sends count datagrams of size bytes from fromNS to dst, where a
// socket in dstNS receives them (so no ICMP port-unreachable comes back).
func sendUDP(t *testing.T, fromNS, dstNS string, dst netip.AddrPort, count, size int) {
	t.Helper()
	sendUDPVia(t, fromNS, dstNS, dst, dst, count, size)
}

// sendUDPVia is sendUDP to dial, which the network delivers (DNATs) to
// the receiving socket at dst.
func sendUDPVia(t *testing.T, fromNS, dstNS string, dial, dst netip.AddrPort, count, size int) {
	t.Helper()
	network := "udp4"
	if dst.Addr().Is6() {
		network = "udp6"
	}
	rx, err := testnet.ListenPacket(dstNS, network, dst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	c, err := testnet.Dial(context.Background(), fromNS, network, dial.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	before, err := udpArrived(ctx, dstNS, dst.Addr().Is6())
	if err != nil {
		t.Fatal(err)
	}
	// The kernel counts a datagram in when it is read: read them all
	// until rx closes.
	go func() {
		buf := make([]byte, size)
		for {
			if _, _, err := rx.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, size)
	for range count {
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	// Every datagram that reached the receiving socket has gone through
	// the nodes' hooks: wait for them all rather than for a while. Some
	// may not fit the socket's buffer before they are read, which drops
	// them after the hooks: they count as arrived too.
	for {
		now, err := udpArrived(ctx, dstNS, dst.Addr().Is6())
		if err != nil {
			t.Fatal(err)
		}
		if now-before >= uint64(count) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%d of the %d datagrams sent arrived in %s: %v", now-before, count, dstNS, ctx.Err())
		case <-time.After(10 * time.Millisecond): // the poll interval
		}
	}
}

// udpArrived returns how many UDP datagrams of a family reached a socket
// in ns: delivered, or dropped for want of buffer space.
func udpArrived(ctx context.Context, ns string, v6 bool) (uint64, error) {
	names := []string{"UdpInDatagrams", "UdpRcvbufErrors"}
	if v6 {
		names = []string{"Udp6InDatagrams", "Udp6RcvbufErrors"}
	}
	out, err := testnet.Exec(ctx, ns, append([]string{"nstat", "-asz"}, names...)...)
	if err != nil {
		return 0, err
	}
	var sum uint64
	found := 0
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && (f[0] == names[0] || f[0] == names[1]) {
			n, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parsing nstat output %q: %w", line, err)
			}
			sum += n
			found++
		}
	}
	if found != len(names) {
		return 0, fmt.Errorf("nstat printed no %v: %s", names, out)
	}
	return sum, nil
}

func ping(t *testing.T, fromNS string, dst netip.Addr, count int) {
	t.Helper()
	args := []string{"ping", "-q", "-c", strconv.Itoa(count), "-i", "0.01", "-W", "2", dst.String()}
	if _, err := testnet.Exec(context.Background(), fromNS, args...); err != nil {
		t.Fatal(err)
	}
}

func drain(t testing.TB, d *Datapath) *Drained {
	t.Helper()
	var dr Drained
	if err := d.Drain(&dr); err != nil {
		t.Fatal(err)
	}
	return &dr
}

func total(flows []flow.Record) flow.Counts {
	var c flow.Counts
	for _, f := range flows {
		c.Add(f.Counts)
	}
	return c
}

func find(flows []flow.Record, src, dst netip.Addr, proto uint8) (flow.Counts, bool) {
	var c flow.Counts
	ok := false
	for _, f := range flows {
		if f.Src == src && f.Dst == dst && f.Proto == proto {
			c.Add(f.Counts)
			ok = true
		}
	}
	return c, ok
}

// TestTrafficMatchesNftables sends real traffic of every kind through two
// node namespaces with offloads off and compares, per node, the drained
// bytes and packets with an nftables counter at the same hook and priority
// matching the same local prefixes.
func TestTrafficMatchesNftables(t *testing.T) {
	testutil.RequireRoot(t)
	topo := twoNodes(t, false)
	a, b := topo.Node("a"), topo.Node("b")
	a1, a2, b1 := topo.Pod("a1"), topo.Pod("a2"), topo.Pod("b1")
	dpA := attachNode(t, a, Config{})
	dpB := attachNode(t, b, Config{})
	ctx := context.Background()
	refA, err := testnet.InstallCounter(ctx, a.NS, DefaultNetfilterPriority, a.LocalPrefixes())
	if err != nil {
		t.Fatal(err)
	}
	refB, err := testnet.InstallCounter(ctx, b.NS, DefaultNetfilterPriority, b.LocalPrefixes())
	if err != nil {
		t.Fatal(err)
	}

	sendTCP(t, a1.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 5432), 2<<20)   // cross-node pod to pod
	sendTCP(t, a1.NS, a2.NS, netip.AddrPortFrom(a2.IPv4, 8080), 300<<10) // same node
	sendTCP(t, b1.NS, a1.NS, netip.AddrPortFrom(a1.IPv6, 443), 1<<20)    // IPv6
	sendTCP(t, a.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 9090), 200<<10)  // host network source
	sendUDP(t, a2.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 53), 100, 1000)
	sendUDP(t, a2.NS, b1.NS, netip.AddrPortFrom(b1.IPv6, 53), 50, 1200)
	ping(t, a1.NS, b1.IPv4, 5)
	ping(t, b1.NS, a2.IPv6, 5)

	for _, tc := range []struct {
		name string
		dp   *Datapath
		ref  *testnet.Counter
		node *testnet.Node
	}{{"node a", dpA, refA, a}, {"node b", dpB, refB, b}} {
		want, err := tc.ref.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		dr := drain(t, tc.dp)
		got := total(dr.Flows)
		if got.Bytes != want.Bytes || got.Packets != want.Packets {
			t.Errorf("%s: datapath counted %d bytes / %d packets, nftables %d / %d", tc.name, got.Bytes, got.Packets, want.Bytes, want.Packets)
		}
		for i, c := range dr.Uncounted {
			if Reason(i) != ReasonNotLocal && !c.IsZero() {
				t.Errorf("%s: uncounted %s: %+v", tc.name, Reason(i), c)
			}
		}
		// Only local sources: replies and forwarded traffic from the
		// other node are left to that node's agent.
		for _, f := range dr.Flows {
			local := false
			for _, p := range tc.node.LocalPrefixes() {
				local = local || p.Contains(f.Src)
			}
			if !local {
				t.Errorf("%s: counted a flow from non-local source %v", tc.name, f.Key)
			}
		}
		if dr.Uncounted[ReasonNotLocal].Packets == 0 {
			t.Errorf("%s: no forwarded non-local packets seen; the topology did not route through the node", tc.name)
		}
		t.Logf("%s: %d flows, %d bytes, %d packets (nftables %d / %d), not local %+v", tc.name, len(dr.Flows), got.Bytes, got.Packets, want.Bytes, want.Packets, dr.Uncounted[ReasonNotLocal])
		if t.Failed() {
			for _, f := range dr.Flows {
				t.Logf("  %v -> %v proto %d port %d dst=%v: %+v", f.Src, f.Dst, f.Proto, f.Port, f.PortIsDst, f.Counts)
			}
		}
	}
}

// TestFlowKeys checks that each kind of traffic lands in the flow it
// belongs to: service port and direction, protocol, both families, and the
// reply direction counted on the server's node only.
func TestFlowKeys(t *testing.T) {
	testutil.RequireRoot(t)
	topo := twoNodes(t, false)
	a, b := topo.Node("a"), topo.Node("b")
	a1, b1 := topo.Pod("a1"), topo.Pod("b1")
	dpA := attachNode(t, a, Config{})
	dpB := attachNode(t, b, Config{})

	const payload = 1 << 20
	sendTCP(t, a1.NS, b1.NS, netip.AddrPortFrom(b1.IPv6, 5432), payload)
	sendUDP(t, a1.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 53), 10, 512)
	ping(t, a.NS, b1.IPv4, 3)
	drA, drB := drain(t, dpA), drain(t, dpB)

	tcp, ok := find(drA.Flows, a1.IPv6, b1.IPv6, 6)
	if !ok {
		t.Fatalf("no IPv6 TCP flow a1 -> b1 on node a: %+v", drA.Flows)
	}
	// Every segment carries at least 40 (IPv6) + 20 (TCP) header bytes.
	if tcp.Bytes < payload+60*tcp.Packets {
		t.Errorf("tcp flow %+v counts fewer bytes than payload plus headers", tcp)
	}
	for _, f := range drA.Flows {
		if f.Src == a1.IPv6 && f.Proto == 6 && (f.Port != 5432 || !f.PortIsDst) {
			t.Errorf("client flow keyed by port %d (dst=%v), want service port 5432 as destination", f.Port, f.PortIsDst)
		}
	}
	ack, ok := find(drB.Flows, b1.IPv6, a1.IPv6, 6)
	if !ok || ack.Packets == 0 {
		t.Fatalf("no reply flow b1 -> a1 on node b: %+v", drB.Flows)
	}
	for _, f := range drB.Flows {
		if f.Src == b1.IPv6 && f.Proto == 6 && (f.Port != 5432 || f.PortIsDst) {
			t.Errorf("reply flow keyed by port %d (dst=%v), want service port 5432 as source", f.Port, f.PortIsDst)
		}
	}
	udp, ok := find(drA.Flows, a1.IPv4, b1.IPv4, 17)
	if want := (flow.Counts{Bytes: 10 * (512 + 28), Packets: 10}); !ok || udp != want {
		t.Errorf("udp flow = %+v, want %+v", udp, want)
	}
	icmp, ok := find(drA.Flows, a.IPv4, b1.IPv4, 1)
	if want := (flow.Counts{Bytes: 3 * 84, Packets: 3}); !ok || icmp != want {
		t.Errorf("icmp echo flow from the node = %+v, want %+v", icmp, want)
	}
}

// TestGSOCountsEverySegment sends the same bulk transfer with offloads off
// and on: with TSO/GSO one skb carries many segments, and the datapath must
// still count each segment as a packet with its own headers. The truth is
// the sending stack's own count of the segments it sent
// (testnet.TCPSegmentsSent), and, for bytes, the nftables counter at the
// same hook: the same skbs, with one set of headers per skb where the wire
// has one per segment.
func TestGSOCountsEverySegment(t *testing.T) {
	testutil.RequireRoot(t)
	// Whole-segment writes (MSS 1448 with timestamps on a 1500 MTU). TSO
	// still emits a short segment now and then (a window edge, a probe),
	// which TcpOutSegs counts: the two runs need not agree with each
	// other, each must agree with its own sender.
	const payload = 160 * 45 * 1448
	const hdr = 20 + 32 // IPv4 and TCP with timestamps, on every segment but the SYN
	type run struct {
		flow flow.Counts
		skbs testnet.CounterValue
		segs uint64 // sent by the pod's stack
	}
	// measure runs the transfer until a run in which the pod's link
	// dropped nothing: a segment dropped before the node never reaches
	// the hook, so the stack would count a packet the datapath cannot see.
	measure := func(offloads bool) run {
		for try := 1; ; try++ {
			topo := twoNodes(t, offloads)
			a := topo.Node("a")
			a1, b1 := topo.Pod("a1"), topo.Pod("b1")
			dp := attachNode(t, a, Config{})
			ref, err := testnet.InstallCounterMatch(context.Background(), a.NS, DefaultNetfilterPriority, []netip.Prefix{netip.PrefixFrom(a1.IPv4, 32)}, "meta l4proto tcp")
			if err != nil {
				t.Fatal(err)
			}
			sendTCP(t, a1.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 5001), payload)
			var r run
			if r.skbs, err = ref.Read(context.Background()); err != nil {
				t.Fatal(err)
			}
			var ok bool
			if r.flow, ok = find(drain(t, dp).Flows, a1.IPv4, b1.IPv4, 6); !ok {
				t.Fatal("no flow a1 -> b1")
			}
			if r.segs, err = testnet.TCPSegmentsSent(context.Background(), a1.NS); err != nil {
				t.Fatal(err)
			}
			dropped, err := testnet.TxDropped(context.Background(), a1.NS, "eth0")
			if err != nil {
				t.Fatal(err)
			}
			topo.Close()
			if dropped != 0 {
				if try == 3 {
					t.Fatalf("offloads %v: the pod's link dropped packets in %d runs in a row (%d in the last)", offloads, try, dropped)
				}
				t.Logf("offloads %v: the pod's link dropped %d packets; running again", offloads, dropped)
				continue
			}
			return r
		}
	}
	for _, offloads := range []bool{false, true} {
		r := measure(offloads)
		t.Logf("offloads %v: %+v; %d segments sent; nftables %+v", offloads, r.flow, r.segs, r.skbs)
		if offloads && r.skbs.Packets*2 > r.segs {
			t.Fatalf("offloads on: %d skbs for %d segments: GSO did not happen, the test proves nothing", r.skbs.Packets, r.segs)
		}
		if r.flow.Packets != r.segs {
			t.Errorf("offloads %v: %d packets counted, the sender sent %d segments", offloads, r.flow.Packets, r.segs)
		}
		if r.segs < r.skbs.Packets {
			t.Fatalf("offloads %v: nftables saw %d skbs, more than the %d segments sent", offloads, r.skbs.Packets, r.segs)
		}
		if want := r.skbs.Bytes + hdr*(r.segs-r.skbs.Packets); r.flow.Bytes != want {
			t.Errorf("offloads %v: %d bytes counted, want %d: nftables' %d plus %d bytes of headers for each of the %d segments beyond its %d skbs",
				offloads, r.flow.Bytes, want, r.skbs.Bytes, hdr, r.segs-r.skbs.Packets, r.skbs.Packets)
		}
	}
}

// TestSourcesOutsideLocalPrefixesNotCounted: a node whose prefixes do not
// cover a pod counts nothing of its traffic, and counts it again once the
// prefix is added (prefix updates apply live).
func TestSourcesOutsideLocalPrefixesNotCounted(t *testing.T) {
	testutil.RequireRoot(t)
	topo := twoNodes(t, false)
	a := topo.Node("a")
	a1, b1 := topo.Pod("a1"), topo.Pod("b1")
	dp := attachNode(t, a, Config{})
	if err := dp.SetLocalPrefixes([]netip.Prefix{netip.PrefixFrom(a.IPv4, 32)}); err != nil {
		t.Fatal(err)
	}
	sendUDP(t, a1.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 7), 20, 100)
	dr := drain(t, dp)
	if len(dr.Flows) != 0 {
		t.Errorf("counted %d flows from sources outside the local prefixes: %+v", len(dr.Flows), dr.Flows)
	}
	if got := dr.Uncounted[ReasonNotLocal].Packets; got < 20 {
		t.Errorf("not-local packets = %d, want at least the 20 sent", got)
	}
	if err := dp.SetLocalPrefixes(a.LocalPrefixes()); err != nil {
		t.Fatal(err)
	}
	sendUDP(t, a1.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 7), 20, 100)
	if c, _ := find(drain(t, dp).Flows, a1.IPv4, b1.IPv4, 17); c.Packets != 20 {
		t.Errorf("after adding the pod CIDR: %+v, want 20 packets", c)
	}
}

// TestBadConfiguration checks that mistakes are errors with a message, not
// panics.
func TestBadConfiguration(t *testing.T) {
	testutil.RequireRoot(t)
	d, err := Load(Config{MaxFlows: 128})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	tests := []struct {
		name string
		fn   func() error
	}{
		{"invalid prefix", func() error { return d.SetLocalPrefixes([]netip.Prefix{{}}) }},
		{"missing namespace", func() error { return d.AttachNetfilter("/var/run/netns/kzn-does-not-exist", 99) }},
		{"priority at NF_IP_PRI_FIRST", func() error { return d.AttachNetfilter("", -2147483648) }},
		{"not a cgroup", func() error { return d.AttachCgroup(t.TempDir()) }},
		{"missing cgroup", func() error { return d.AttachCgroup("/sys/fs/cgroup/unified/kzn-does-not-exist") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.fn()
			if err == nil {
				t.Fatal("no error")
			}
			t.Log(err)
		})
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	var dr Drained
	if err := d.Drain(&dr); err == nil {
		t.Error("Drain after Close: no error")
	}
	if !errors.Is(fmt.Errorf("x: %w", ErrNotSupported), ErrNotSupported) {
		t.Error("ErrNotSupported does not wrap")
	}
}
