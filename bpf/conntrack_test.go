//go:build linux

package bpf

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"unsafe"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// Service virtual IPs of TestOriginalDestination, outside every range of
// the topology: only the DNAT rules make them reachable.
var (
	vip4       = netip.MustParseAddr("10.96.0.10")
	vip4Host   = netip.MustParseAddr("10.96.0.11")
	vip6       = netip.MustParseAddr("fd00:96::10")
	notrackUDP = uint16(9999)
)

// serviceRules is node a's nftables ruleset of TestOriginalDestination, as
// kube-proxy's nftables mode writes Services: a nat table per family whose
// prerouting (pod clients) and output (host-network clients) chains jump
// to one chain of `dnat to <backend>:<port>` rules per virtual IP and
// port (and two that are not kube-proxy's: a DNAT of the port alone, and
// one of ICMP echo requests, which have no ports); plus a raw table that
// leaves UDP to port 9999 untracked, with a counter proving those packets
// had no conntrack entry at POSTROUTING.
func serviceRules(a2, b1 *testnet.Pod) string {
	return fmt.Sprintf(`table ip kzn_svc {
  chain services {
    ip daddr %[1]s tcp dport 80 dnat to %[4]s:8080
    ip daddr %[2]s tcp dport 80 dnat to %[5]s:8080
    ip daddr %[1]s udp dport 53 dnat to %[5]s:5353
    ip daddr %[5]s tcp dport 81 dnat to %[5]s:8080
    ip daddr %[1]s icmp type echo-request dnat to %[5]s
  }
  chain pre { type nat hook prerouting priority dstnat; policy accept; jump services; }
  chain out { type nat hook output priority -100; policy accept; jump services; }
}
table ip6 kzn_svc {
  chain services {
    ip6 daddr %[3]s tcp dport 80 dnat to [%[6]s]:8080
    ip6 daddr %[3]s udp dport 53 dnat to [%[7]s]:5353
    ip6 daddr %[3]s icmpv6 type echo-request dnat to %[7]s
  }
  chain pre { type nat hook prerouting priority dstnat; policy accept; jump services; }
  chain out { type nat hook output priority -100; policy accept; jump services; }
}
table inet kzn_raw {
  chain pre { type filter hook prerouting priority raw; policy accept; udp dport %[8]d notrack; }
  chain post { type filter hook postrouting priority 98; policy accept; udp dport %[8]d ct state untracked counter; }
}
`, vip4, vip4Host, vip6, a2.IPv4, b1.IPv4, a2.IPv6, b1.IPv6, notrackUDP)
}

// TestOriginalDestination sends TCP, UDP and ICMP echo requests, IPv4 and
// IPv6, through node a, where kube-proxy-style nftables rules DNAT Service
// virtual IPs to backend pods (real conntrack and NAT in the node's
// namespace), and checks each flow's original destination: the virtual IP
// and port for a client's packets to a Service (port 0 for ICMP), the
// address and port addressed when NAT rewrote the port alone, none for the same backend addressed
// directly, for the backend's replies on a DNATed connection, and for
// untracked packets, which are still counted. Every case's bytes and
// packets equal an nftables counter of the node's local sources at the
// hook's priority, each flow's a counter of its address pair, and a UDP
// flow's what was sent.
func TestOriginalDestination(t *testing.T) {
	testutil.RequireRoot(t)
	topo := twoNodes(t, false)
	a := topo.Node("a")
	a1, a2, b1 := topo.Pod("a1"), topo.Pod("a2"), topo.Pod("b1")
	dp := attachNode(t, a, Config{})
	ctx := context.Background()
	rules := serviceRules(a2, b1)
	if _, err := testnet.Exec(ctx, a.NS, "sh", "-c", "nft -f - <<'EOF'\n"+rules+"EOF\n"); err != nil {
		t.Fatalf("installing the service rules: %v", err)
	}
	// A host-network client routes a virtual IP before the output chain
	// rewrites it: the route kube-proxy nodes have through their uplink.
	if _, err := testnet.Exec(ctx, a.NS, "ip", "route", "add", "10.96.0.0/16", "dev", "fab0"); err != nil {
		t.Fatal(err)
	}
	ref, err := testnet.InstallCounter(ctx, a.NS, DefaultNetfilterPriority, a.LocalPrefixes())
	if err != nil {
		t.Fatal(err)
	}
	// And per address pair: each expected flow is the only one of its
	// pair in its case.
	pairs := testnet.NewReference(DefaultNetfilterPriority)

	ap := netip.AddrPortFrom
	const tcpBytes, udpCount, udpSize = 256 << 10, 40, 700
	tests := []struct {
		name      string
		client    string         // namespace
		src       netip.Addr     // the client's address
		dial      netip.AddrPort // what the client addresses
		backend   *testnet.Pod
		dst       netip.AddrPort // where the backend listens
		proto     uint8
		untracked bool // the raw table leaves the packets untracked
		// want are the flows of local sources of the case's protocol
		// (ICMP: 1 for both families): the client's, and the backend's
		// replies when the backend is on node a.
		want []flow.Key
	}{
		{
			name: "tcp4 to a service, backend on the node", client: a1.NS, src: a1.IPv4,
			dial: ap(vip4, 80), backend: a2, dst: ap(a2.IPv4, 8080), proto: 6,
			want: []flow.Key{
				{Src: a1.IPv4, Dst: a2.IPv4, Proto: 6, Port: 8080, PortIsDst: true, OrigDst: ap(vip4, 80)},
				{Src: a2.IPv4, Dst: a1.IPv4, Proto: 6, Port: 8080}, // the reply direction
			},
		},
		{
			name: "tcp6 to a service, backend on the node", client: a1.NS, src: a1.IPv6,
			dial: ap(vip6, 80), backend: a2, dst: ap(a2.IPv6, 8080), proto: 6,
			want: []flow.Key{
				{Src: a1.IPv6, Dst: a2.IPv6, Proto: 6, Port: 8080, PortIsDst: true, OrigDst: ap(vip6, 80)},
				{Src: a2.IPv6, Dst: a1.IPv6, Proto: 6, Port: 8080},
			},
		},
		{
			name: "tcp4 to the same backend directly", client: a1.NS, src: a1.IPv4,
			dial: ap(a2.IPv4, 8080), backend: a2, dst: ap(a2.IPv4, 8080), proto: 6,
			want: []flow.Key{
				{Src: a1.IPv4, Dst: a2.IPv4, Proto: 6, Port: 8080, PortIsDst: true},
				{Src: a2.IPv4, Dst: a1.IPv4, Proto: 6, Port: 8080},
			},
		},
		{
			name: "tcp6 to the same backend directly", client: a1.NS, src: a1.IPv6,
			dial: ap(a2.IPv6, 8080), backend: a2, dst: ap(a2.IPv6, 8080), proto: 6,
			want: []flow.Key{
				{Src: a1.IPv6, Dst: a2.IPv6, Proto: 6, Port: 8080, PortIsDst: true},
				{Src: a2.IPv6, Dst: a1.IPv6, Proto: 6, Port: 8080},
			},
		},
		{
			name: "tcp4 from the host network to a service (output chain)", client: a.NS, src: a.IPv4,
			dial: ap(vip4Host, 80), backend: b1, dst: ap(b1.IPv4, 8080), proto: 6,
			want: []flow.Key{
				{Src: a.IPv4, Dst: b1.IPv4, Proto: 6, Port: 8080, PortIsDst: true, OrigDst: ap(vip4Host, 80)},
			},
		},
		{
			name: "udp4 to a service, backend on another node", client: a1.NS, src: a1.IPv4,
			dial: ap(vip4, 53), backend: b1, dst: ap(b1.IPv4, 5353), proto: 17,
			want: []flow.Key{
				{Src: a1.IPv4, Dst: b1.IPv4, Proto: 17, Port: 5353, PortIsDst: true, OrigDst: ap(vip4, 53)},
			},
		},
		{
			name: "udp6 to a service, backend on another node", client: a1.NS, src: a1.IPv6,
			dial: ap(vip6, 53), backend: b1, dst: ap(b1.IPv6, 5353), proto: 17,
			want: []flow.Key{
				{Src: a1.IPv6, Dst: b1.IPv6, Proto: 17, Port: 5353, PortIsDst: true, OrigDst: ap(vip6, 53)},
			},
		},
		{
			// nf_nat rewrote the port alone: the address is the packet's.
			name: "tcp4 to a backend whose port alone is rewritten", client: a1.NS, src: a1.IPv4,
			dial: ap(b1.IPv4, 81), backend: b1, dst: ap(b1.IPv4, 8080), proto: 6,
			want: []flow.Key{
				{Src: a1.IPv4, Dst: b1.IPv4, Proto: 6, Port: 8080, PortIsDst: true, OrigDst: ap(b1.IPv4, 81)},
			},
		},
		{
			// No ports: the original destination's port is 0.
			name: "icmp4 echo to a service", client: a1.NS, src: a1.IPv4,
			dial: ap(vip4, 0), backend: b1, dst: ap(b1.IPv4, 0), proto: 1,
			want: []flow.Key{{Src: a1.IPv4, Dst: b1.IPv4, Proto: 1, OrigDst: ap(vip4, 0)}},
		},
		{
			name: "icmp6 echo to a service", client: a1.NS, src: a1.IPv6,
			dial: ap(vip6, 0), backend: b1, dst: ap(b1.IPv6, 0), proto: 1,
			want: []flow.Key{{Src: a1.IPv6, Dst: b1.IPv6, Proto: 58, OrigDst: ap(vip6, 0)}},
		},
		{
			name: "icmp4 echo directly", client: a1.NS, src: a1.IPv4,
			dial: ap(b1.IPv4, 0), backend: b1, dst: ap(b1.IPv4, 0), proto: 1,
			want: []flow.Key{{Src: a1.IPv4, Dst: b1.IPv4, Proto: 1}},
		},
		{
			name: "udp4 untracked", client: a1.NS, src: a1.IPv4,
			dial: ap(b1.IPv4, notrackUDP), backend: b1, dst: ap(b1.IPv4, notrackUDP), proto: 17, untracked: true,
			want: []flow.Key{{Src: a1.IPv4, Dst: b1.IPv4, Proto: 17, Port: notrackUDP, PortIsDst: true}},
		},
		{
			name: "udp6 untracked", client: a1.NS, src: a1.IPv6,
			dial: ap(b1.IPv6, notrackUDP), backend: b1, dst: ap(b1.IPv6, notrackUDP), proto: 17, untracked: true,
			want: []flow.Key{{Src: a1.IPv6, Dst: b1.IPv6, Proto: 17, Port: notrackUDP, PortIsDst: true}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			drain(t, dp) // what earlier cases left
			for _, k := range tt.want {
				if p := (testnet.Pair{Src: k.Src, Dst: k.Dst}); !pairs.Watched(p) {
					if err := pairs.Watch(ctx, a.NS, p); err != nil {
						t.Fatal(err)
					}
				}
			}
			before, err := ref.Read(ctx)
			if err != nil {
				t.Fatal(err)
			}
			pairsBefore, err := pairs.Read(ctx)
			if err != nil {
				t.Fatal(err)
			}
			untrackedBefore := untrackedPackets(t, a.NS)
			switch tt.proto {
			case 6:
				sendTCPVia(t, tt.client, tt.backend.NS, tt.dial, tt.dst, tcpBytes)
			case 17:
				sendUDPVia(t, tt.client, tt.backend.NS, tt.dial, tt.dst, udpCount, udpSize)
			default:
				if _, err := testnet.Exec(ctx, tt.client, "ping", "-q", "-c", "5", "-i", "0.05", "-W", "2", tt.dial.Addr().String()); err != nil {
					t.Fatalf("pinging %s: %v", tt.dial.Addr(), err)
				}
			}
			after, err := ref.Read(ctx)
			if err != nil {
				t.Fatal(err)
			}
			pairsAfter, err := pairs.Read(ctx)
			if err != nil {
				t.Fatal(err)
			}
			dr := drain(t, dp)

			want := flow.Counts{Bytes: after.Bytes - before.Bytes, Packets: after.Packets - before.Packets}
			if got := total(dr.Flows); got != want {
				t.Errorf("datapath counted %+v, nftables %+v", got, want)
			}
			for r, c := range dr.Uncounted {
				if Reason(r) != ReasonNotLocal && !c.IsZero() {
					t.Errorf("uncounted %s: %+v", Reason(r), c)
				}
			}
			got := map[flow.Key]flow.Counts{}
			for _, f := range dr.Flows {
				// Of the case's sources: not the node's own neighbour
				// discovery.
				if f.Proto == tt.want[0].Proto && slices.ContainsFunc(tt.want, func(k flow.Key) bool { return k.Src == f.Src }) {
					c := got[f.Key]
					c.Add(f.Counts)
					got[f.Key] = c
				}
			}
			for _, k := range tt.want {
				p := testnet.Pair{Src: k.Src, Dst: k.Dst}
				pb, pa := pairsBefore[p], pairsAfter[p]
				want := flow.Counts{Bytes: pa.Bytes - pb.Bytes, Packets: pa.Packets - pb.Packets}
				if c, ok := got[k]; !ok || c != want || want.Packets == 0 {
					t.Errorf("flow %s counted %+v (present %v), nftables %+v for its addresses", keyString(k), c, ok, want)
				}
			}
			for k, c := range got {
				if !slices.Contains(tt.want, k) {
					t.Errorf("unexpected flow %s: %+v", keyString(k), c)
				}
			}
			if tt.proto == 17 {
				hdr := uint64(28)
				if tt.src.Is6() {
					hdr = 48
				}
				sent := flow.Counts{Bytes: udpCount * (udpSize + hdr), Packets: udpCount}
				if c := got[tt.want[0]]; c != sent {
					t.Errorf("flow %s counted %+v, sent %+v", keyString(tt.want[0]), c, sent)
				}
			}
			if n := untrackedPackets(t, a.NS) - untrackedBefore; tt.untracked && n != udpCount {
				t.Errorf("%d packets untracked at POSTROUTING, want the %d sent: the case does not test untracked packets", n, udpCount)
			} else if !tt.untracked && n != 0 {
				t.Errorf("%d packets untracked", n)
			}
			if t.Failed() {
				for _, f := range dr.Flows {
					t.Logf("  %s: %+v", keyString(f.Key), f.Counts)
				}
			}
		})
	}
}

// untrackedPackets reads the counter of serviceRules' raw table: the
// packets to the notrack port that had no conntrack entry at POSTROUTING.
func untrackedPackets(t *testing.T, ns string) uint64 {
	t.Helper()
	out, err := testnet.Exec(context.Background(), ns, "nft", "list", "chain", "inet", "kzn_raw", "post")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(out), "counter packets ")
	var n uint64
	if !ok {
		t.Fatalf("no counter in %s", out)
	}
	if _, err := fmt.Sscanf(rest, "%d", &n); err != nil {
		t.Fatalf("parsing %q: %v", rest, err)
	}
	return n
}

// keyString formats a flow key for test messages.
func keyString(k flow.Key) string {
	s := fmt.Sprintf("%s -> %s %s port %d (dst %v)", k.Src, k.Dst, flow.ProtoName(k.Proto), k.Port, k.PortIsDst)
	if k.OrigDst.IsValid() {
		s += " orig " + k.OrigDst.String()
	}
	return s
}

// TestOriginalDestinationIPv6Prefixes sends UDP from one CPU to two IPv6
// Services whose virtual IPs differ in their first 12 bytes, DNATed to the
// same backend port, so the two flows differ only in their original
// destination. In each generation the Service sent to first sets the
// prefix of the table's IPv6 original destinations on that CPU (the CPU's
// line says which) and its flow takes a table slot; the other's packets
// are records of the flow log, not spills. Both come back
// exact, with their own address, in three generations: the third reuses
// the first's, whose prefix must have been cleared for it.
func TestOriginalDestinationIPv6Prefixes(t *testing.T) {
	testutil.RequireRoot(t)
	topo := twoNodes(t, false)
	a := topo.Node("a")
	a1, b1 := topo.Pod("a1"), topo.Pod("b1")
	dp := attachNode(t, a, Config{})
	ctx := context.Background()
	other := netip.MustParseAddr("fd00:97:0:1::10")
	rules := fmt.Sprintf(`table ip6 kzn_svc {
  chain pre {
    type nat hook prerouting priority dstnat; policy accept;
    ip6 daddr { %s, %s } udp dport 53 dnat to [%s]:5353
  }
}
`, vip6, other, b1.IPv6)
	if _, err := testnet.Exec(ctx, a.NS, "sh", "-c", "nft -f - <<'EOF'\n"+rules+"EOF\n"); err != nil {
		t.Fatalf("installing the service rules: %v", err)
	}
	const cpu, count, size = 0, 20, 300
	ap := netip.AddrPortFrom
	key := func(vip netip.Addr) flow.Key {
		return flow.Key{Src: a1.IPv6, Dst: b1.IPv6, Proto: 17, Port: 5353, PortIsDst: true, OrigDst: ap(vip, 53)}
	}
	sent := flow.Counts{Bytes: count * (size + 48), Packets: count}
	drain(t, dp) // what the topology's setup left
	for round, first := range []netip.Addr{vip6, other, other} {
		second := vip6
		if first == vip6 {
			second = other
		}
		g := dp.active
		testutil.OnCPU(t, cpu, func() {
			sendUDPVia(t, a1.NS, b1.NS, ap(first, 53), ap(b1.IPv6, 5353), count, size)
			sendUDPVia(t, a1.NS, b1.NS, ap(second, 53), ap(b1.IPv6, 5353), count, size)
			sendUDPVia(t, a1.NS, b1.NS, ap(first, 53), ap(b1.IPv6, 5353), count, size)
		})
		if g != dp.active {
			t.Fatal("the generation changed while sending")
		}
		want := first.As16()
		var prefix [3]uint32
		for i := range prefix {
			prefix[i] = binary.LittleEndian.Uint32(want[4*i:])
		}
		if got := dp.inflight[cpu].Orig6[g]; got != prefix {
			t.Errorf("round %d: generation %d's IPv6 prefix on CPU %d is %x, want %x (%s's, sent to first)", round, g, cpu, got, prefix, first)
		}
		inTable := 0
		slots, _ := dp.region(g, cpu)
		for _, s := range slots {
			const v6orig = uint8(flowFlowFlagFLOW_F_IPV6 | flowFlowFlagFLOW_F_ORIG_DST)
			if s.Epoch == dp.epochs[g] && s.Key[unsafe.Offsetof(flowFlowKey{}.Flags)]&v6orig == v6orig {
				inTable++
			}
		}
		if inTable != 1 {
			t.Errorf("round %d: %d table slots hold a flow with an IPv6 original destination, want 1", round, inTable)
		}
		dr := drain(t, dp)
		got := map[flow.Key]flow.Counts{}
		for _, f := range dr.Flows {
			if f.Src == a1.IPv6 && f.Proto == 17 {
				got[f.Key] = f.Counts
			}
		}
		if c := got[key(first)]; c != (flow.Counts{Bytes: 2 * sent.Bytes, Packets: 2 * sent.Packets}) {
			t.Errorf("round %d: flow to %s (the table's) counted %+v, sent twice %+v", round, first, c, sent)
		}
		if c := got[key(second)]; c != sent {
			t.Errorf("round %d: flow to %s (the log's) counted %+v, sent %+v", round, second, c, sent)
		}
		if len(got) != 2 {
			t.Errorf("round %d: flows from a1 %v, want the two", round, got)
		}
		if dr.Spilled != 0 || uint64(dr.Logged) < sent.Packets {
			t.Errorf("round %d: %d flows spilled, %d records logged; want none spilled and at least the %d packets to %s logged", round, dr.Spilled, dr.Logged, sent.Packets, second)
		}
	}
}
