//go:build linux

package bpf

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// BenchmarkNetfilterConntrack measures what reading the packet's conntrack
// entry (for a flow's original destination, orig_dst in flow.c) costs an
// existing flow: the program as the agent loads it (kernel0-ns/op,
// net0-ns/op) against the same build with the read switched off at load
// time (bench_no_conntrack; kernel1-ns/op, net1-ns/op), and the empty
// program (empty-ns/op), in one run.
//
//   - test-run/*: BenchmarkNetfilter's packets of an existing flow in
//     BPF_PROG_TEST_RUN, alternated in batches (benchPaired). A test run's
//     skb has no conntrack entry, so this is what every packet without
//     one pays (untracked, or on a node without conntrack): the load of
//     skb->_nfct and a branch.
//
//   - dnat/*: real UDP datagrams (64-byte payloads) from a pod to a
//     Service's virtual IP, DNATed by kube-proxy-style nftables rules in
//     the node's namespace (benchServiceRules) to a backend on another
//     node: every packet has a conntrack entry with IPS_DST_NAT, and the
//     program reads the status and the original tuple's destination into
//     the key (an IPv6 one's first 12 bytes into the CPU's line). The
//     datagrams go round-robin to benchServicePorts ports of the virtual
//     IP, each DNATed to its own backend port: as many flows, whose slots
//     lie in as many places of the table. Through the Service the build
//     without the read gives its flows the original destinations the
//     agent's build reads from conntrack, from the packet instead
//     (bench_orig: the virtual IP, the Service port from the destination
//     port), so both builds have the same keys and count in the same
//     slots: the read is all that differs (with keys of their own, each
//     build would also pay for its own slots' lines, which the other's
//     runs do not bring into the caches). The -direct variants send to
//     the backend's ports themselves: a conntrack entry without
//     IPS_DST_NAT, what most tracked packets have, whose status the
//     program reads and stops. The -same variants compare the build
//     without the read with itself, through the Service: the baseline,
//     what the method alone makes of two programs with the same code.
//
//     The sender's thread keeps the last CPU, where the datagrams cross
//     the namespaces in its softirqs and both builds run, and the rest
//     of the process (the sockets' readers) the other CPUs.
//
//     A run on a real packet pays cache misses (the stack evicts the
//     table's lines between two packets), and two loaded copies of the
//     same code differ, run after run, by more than the read costs
//     (where their code and data land in memory). So the benchmark
//     compares fresh copies: each round loads a copy of both builds
//     (counting into the same maps; the one loaded first alternates from
//     round to round), attaches them to the node's POSTROUTING with the
//     empty program (priority 95 and 96, the empty one at 97, the
//     copies swapping places between the round's two phases of 2,000
//     datagrams: the first to run takes the misses on the packet's lines
//     that the second is spared; which one is first in the first phase
//     alternates every two rounds), sends 64 untimed datagrams before
//     each phase (the first packets after an attach bring the copies'
//     code and data into the caches), and closes them. Times are the
//     kernel's run-time statistics (BPF_ENABLE_STATS: run_time_ns over
//     run_cnt), whose own clock reads are in all three figures alike.
//     kernel0/1-ns/op and net0/1-ns/op are over all timed rounds;
//     delta-ns/op is the median over the rounds of the round's
//     kernel0 - kernel1, what the read adds to a packet, robust to a
//     round disturbed by the rest of the machine. ns/op is the sender's
//     time per datagram, loading and attaching included. The benchmark
//     checks that the first build alone (the agent's, but in -same)
//     gives the datagrams' flows the virtual IP and port as their
//     original destination, only through the Service, and at the end
//     that both builds counted every datagram in those flows.
func BenchmarkNetfilterConntrack(b *testing.B) {
	testutil.RequireRoot(b)
	for _, c := range netfilterCases(b)[:2] {
		b.Run("test-run/"+c.name, func(b *testing.B) {
			d := loadLocal(b, Config{}, c.prefix)
			without := noConntrackProgram(b, d, "kzn_netfilter")
			benchPaired(b, c.pkt, benchProg{d.objs.KznNetfilter, c.pkt}, benchProg{without, c.pkt})
		})
	}
	b.Run("dnat", func(b *testing.B) {
		stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
		if err != nil {
			b.Fatalf("enabling BPF run statistics: %v", err)
		}
		b.Cleanup(func() { stats.Close() })
		topo := testnet.BuildT(b, testnet.Spec{Nodes: []testnet.NodeSpec{
			{Name: "a", Zone: "zone-a", Pods: []string{"a1", "a2"}},
			{Name: "b", Zone: "zone-b", Pods: []string{"b1"}},
		}})
		a := topo.Node("a")
		a1, b1 := topo.Pod("a1"), topo.Pod("b1")
		if _, err := testnet.Exec(context.Background(), a.NS, "sh", "-c", "nft -f - <<'EOF'\n"+benchServiceRules(b1)+"EOF\n"); err != nil {
			b.Fatalf("installing the service rules: %v", err)
		}
		d := loadWith(b, Load, Config{}, prefixStrings(a.LocalPrefixes())...)
		empty := emptyNetfilter(b)
		// The datagrams cross the namespaces in the softirqs of the
		// sender's CPU, where both builds run: the sender keeps the last
		// CPU and the rest of this process (the sockets' readers) the
		// others, so that between two packets that CPU runs the stack
		// and nothing else of this process.
		senderCPU := runtime.NumCPU() - 1
		var sender unix.CPUSet
		sender.Set(senderCPU)
		_, restore, err := testutil.KeepProcessOff(context.Background(), &sender)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			if err := restore(); err != nil {
				b.Error(err)
			}
		})
		// The empty program runs last, after both: the sender is paced
		// by its runs.
		for _, l := range attachAt(b, empty, a.NSPath(), 97) {
			b.Cleanup(func() { l.Close() })
		}
		for _, c := range []struct {
			name     string
			vip, dst netip.Addr
			src      netip.Addr
			direct   bool // to the backend's ports, not through the Service
			same     bool // both programs without the read: the baseline
		}{
			{"udp4", vip4, b1.IPv4, a1.IPv4, false, false},
			{"udp6", vip6, b1.IPv6, a1.IPv6, false, false},
			{"udp4-same", vip4, b1.IPv4, a1.IPv4, false, true},
			{"udp6-same", vip6, b1.IPv6, a1.IPv6, false, true},
			{"udp4-direct", vip4, b1.IPv4, a1.IPv4, true, false},
			{"udp6-direct", vip6, b1.IPv6, a1.IPv6, true, false},
		} {
			b.Run(c.name, func(b *testing.B) {
				// The builds compared: the agent's (or, -same, the one
				// without the read) and the one without the read, which
				// through the Service gives its flows the keys the
				// agent's build reads from conntrack (the virtual IP,
				// the port from the destination port), so that both
				// count in the same slots.
				reads := [2]bool{!c.same, false}
				load := func(read bool) *ebpf.Program {
					var as origFromPort
					if !read && !c.direct {
						as = origFromPort{c.vip, benchBackendPort - benchServicePort}
					}
					p, err := d.loadProgramCopy("kzn_netfilter", read, as)
					if err != nil {
						b.Fatal(err)
					}
					return p
				}
				drain(b, d)
				var vips, dsts []netip.AddrPort
				for i := range benchServicePorts {
					vips = append(vips, netip.AddrPortFrom(c.vip, benchServicePort+uint16(i)))
					dsts = append(dsts, netip.AddrPortFrom(c.dst, benchBackendPort+uint16(i)))
				}
				dials := vips
				if c.direct {
					dials = dsts
				}
				tx := newDatagramSender(b, a1.NS, b1.NS, dials, dsts, empty)
				// flowsOK fails unless the flows drained are the
				// datagrams' flows, each with the virtual IP and port as
				// its original destination through the Service and none
				// sent directly, and they hold n datagrams in all.
				flowsOK := func(n uint64, of string) {
					b.Helper()
					var got uint64
					for _, f := range drain(b, d).Flows {
						k := slices.Index(dsts, netip.AddrPortFrom(f.Dst, f.Port))
						want := flow.Key{Src: c.src, Dst: c.dst, Proto: 17, Port: f.Port, PortIsDst: true}
						if k >= 0 && !c.direct {
							want.OrigDst = vips[k]
						}
						if k < 0 || f.Key != want {
							b.Fatalf("%s: unexpected flow %s", of, keyString(f.Key))
						}
						got += f.Packets
					}
					if got != n {
						b.Fatalf("%s: counted %d datagrams, want %d", of, got, n)
					}
				}
				// The first build alone: the agent's (not -same) reads
				// the keys the other build is given.
				testutil.OnCPU(b, senderCPU, func() {
					p := load(reads[0])
					defer p.Close()
					links := attachAt(b, p, a.NSPath(), 95)
					tx.send(b, benchServicePorts)
					for _, l := range links {
						if err := l.Close(); err != nil {
							b.Fatal(err)
						}
					}
				})
				flowsOK(benchServicePorts, "the first build alone")
				var runs [3]uint64
				var runtime [3]time.Duration
				var deltas []float64 // per round: kernel0 - kernel1, ns per run
				// A round loads a fresh copy of each build (the one loaded
				// first alternating from round to round) and sends two
				// phases of up to phaseLen datagrams, the copies swapping
				// places from one phase to the next (the one first in the
				// round's first phase alternating every two rounds, so
				// that it is the one loaded first in half the rounds),
				// each phase after
				// warm untimed datagrams: the first packets after a copy is
				// attached pay for its code and data coming into the
				// caches, which would otherwise fall on the copy that runs
				// first in the first phase. Round 0 is untimed: it creates
				// both builds' flows.
				const phaseLen = 2000
				const warm = 64
				sent, warmed := 0, 0
				testutil.OnCPU(b, senderCPU, func() {
					for round := 0; sent < b.N; round++ {
						b.StopTimer()
						var progs [2]*ebpf.Program
						for _, i := range [][2]int{{0, 1}, {1, 0}}[round%2] {
							progs[i] = load(reads[i])
						}
						var roundRuns [2]uint64
						var roundTime [2]time.Duration
						for phase := range 2 {
							k := min(phaseLen, b.N-sent)
							if round == 0 {
								k = warm
							}
							first, second := progs[(phase+round/2)%2], progs[(phase+round/2+1)%2]
							links := append(attachAt(b, first, a.NSPath(), 95), attachAt(b, second, a.NSPath(), 96)...)
							all := []*ebpf.Program{progs[0], progs[1], empty}
							if round > 0 {
								tx.send(b, warm)
								warmed += warm
								b.StartTimer()
							}
							before := progStats(b, all)
							tx.send(b, k)
							after := progStats(b, all)
							b.StopTimer()
							if round > 0 {
								for i := range all {
									runs[i] += after[i].RunCount - before[i].RunCount
									runtime[i] += after[i].Runtime - before[i].Runtime
									if i < 2 {
										roundRuns[i] += after[i].RunCount - before[i].RunCount
										roundTime[i] += after[i].Runtime - before[i].Runtime
									}
								}
								sent += k
							}
							for _, l := range links {
								if err := l.Close(); err != nil {
									b.Fatal(err)
								}
							}
						}
						for _, p := range progs {
							p.Close()
						}
						if round > 0 && roundRuns[0] > 0 && roundRuns[1] > 0 {
							deltas = append(deltas, float64(roundTime[0].Nanoseconds())/float64(roundRuns[0])-
								float64(roundTime[1].Nanoseconds())/float64(roundRuns[1]))
						}
					}
				})
				perRun := func(i int) float64 { return float64(runtime[i].Nanoseconds()) / float64(runs[i]) }
				b.ReportMetric(perRun(2), "empty-ns/op")
				for i := range 2 {
					b.ReportMetric(perRun(i), fmt.Sprintf("kernel%d-ns/op", i))
					b.ReportMetric(perRun(i)-perRun(2), fmt.Sprintf("net%d-ns/op", i))
				}
				slices.Sort(deltas)
				b.ReportMetric(deltas[len(deltas)/2], "delta-ns/op")
				// Both builds counted every datagram in the same flows.
				flowsOK(uint64(2*(2*warm+warmed+sent)), "both builds")
			})
		}
	})
}

// BenchmarkCgroupSockLookup measures what the cgroup_skb program pays for
// original destinations on a 1,440-byte TCP packet of an existing flow:
// the program as the agent loads it (kernel0-ns/op) and a copy with the
// socket's recorded-destination lookup switched off (bench_no_conntrack;
// kernel1-ns/op), alternating in batches in one process. BPF_PROG_TEST_RUN
// gives a cgroup_skb program a socket of its own, full and fresh, that no
// connect() recorded: the lookup runs and finds no record, the case of
// every socket the agent saw no connect() of (servers' accepted sockets).
// A socket with a record adds reading it and comparing it with the
// packet's destination, which this cannot measure.
func BenchmarkCgroupSockLookup(b *testing.B) {
	testutil.RequireRoot(b)
	c := netfilterCases(b)[0]
	d := loadLocal(b, Config{}, c.prefix)
	progs := []*ebpf.Program{d.objs.KznCgroupEgress, noConntrackProgram(b, d, "kzn_cgroup_egress")}
	// The test run pulls an Ethernet header off the data: the program
	// sees the IP header first, as at the egress hook.
	pkt := append([]byte{12: 0x08, 13: 0x00}, c.pkt...)
	const batch = 100_000
	b.ResetTimer()
	totals := make([]time.Duration, len(progs))
	for left := b.N; left > 0; {
		n := min(left, batch)
		for i, p := range progs {
			ret, t, err := p.Benchmark(pkt, n, nil)
			if err != nil {
				b.Fatal(err)
			}
			if ret != 1 {
				b.Fatalf("program %d returned %d, want 1 (pass)", i, ret)
			}
			totals[i] += t * time.Duration(n)
		}
		left -= n
	}
	b.StopTimer()
	for i, t := range totals {
		b.ReportMetric(float64(t.Nanoseconds())/float64(b.N), fmt.Sprintf("kernel%d-ns/op", i))
	}
	dr := drain(b, d)
	if want := uint64(2 * b.N); len(dr.Flows) != 1 || dr.Flows[0].Packets != want || dr.Flows[0].OrigDst.IsValid() {
		b.Errorf("flows %+v, want one of %d packets without an original destination", dr.Flows, want)
	}
}

// noConntrackProgram is d.loadProgramCopy without the read, closed when
// the benchmark ends.
func noConntrackProgram(b *testing.B, d *Datapath, name string) *ebpf.Program {
	b.Helper()
	p, err := d.loadProgramCopy(name, false, origFromPort{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}

// prefixStrings formats prefixes for loadWith.
func prefixStrings(ps []netip.Prefix) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.String())
	}
	return out
}

// attachAt attaches prog to POSTROUTING for IPv4 and IPv6 in the
// namespace at nsPath and returns the links.
func attachAt(b *testing.B, prog *ebpf.Program, nsPath string, priority int32) []link.Link {
	b.Helper()
	links, err := testutil.AttachPostrouting(nsPath, prog, priority)
	if err != nil {
		b.Fatal(err)
	}
	return links
}

// progStats reads the kernel's run statistics of each program.
func progStats(b *testing.B, progs []*ebpf.Program) []*ebpf.ProgramStats {
	b.Helper()
	out := make([]*ebpf.ProgramStats, len(progs))
	for i, p := range progs {
		s, err := p.Stats()
		if err != nil {
			b.Fatal(err)
		}
		out[i] = s
	}
	return out
}

// The Services of BenchmarkNetfilterConntrack/dnat: benchServicePorts
// ports of the virtual IPs from benchServicePort up, each DNATed to its
// own port of the backend from benchBackendPort up.
const (
	benchServicePorts = 64
	benchServicePort  = 1000
	benchBackendPort  = 5000
)

// benchServiceRules is the nftables ruleset of
// BenchmarkNetfilterConntrack/dnat, in kube-proxy's form (see
// serviceRules): vip4 and vip6 to the backend b1.
func benchServiceRules(b1 *testnet.Pod) string {
	var r4, r6 strings.Builder
	for i := range benchServicePorts {
		fmt.Fprintf(&r4, "    ip daddr %s udp dport %d dnat to %s:%d\n", vip4, benchServicePort+i, b1.IPv4, benchBackendPort+i)
		fmt.Fprintf(&r6, "    ip6 daddr %s udp dport %d dnat to [%s]:%d\n", vip6, benchServicePort+i, b1.IPv6, benchBackendPort+i)
	}
	const chains = "  chain pre { type nat hook prerouting priority dstnat; policy accept; jump services; }\n"
	return "table ip kzn_svc {\n  chain services {\n" + r4.String() + "  }\n" + chains + "}\n" +
		"table ip6 kzn_svc {\n  chain services {\n" + r6.String() + "  }\n" + chains + "}\n"
}

// datagramSender sends UDP datagrams from a namespace to a list of
// destinations in turn, which the node DNATs to sockets that discard them.
type datagramSender struct {
	conns []net.Conn
	next  int
	prog  *ebpf.Program // a program on the path, whose runs pace the sender
	buf   []byte
}

// newDatagramSender connects a socket in fromNS to each of dials, whose
// datagrams the network delivers to a socket at the same index of dsts in
// dstNS.
func newDatagramSender(b *testing.B, fromNS, dstNS string, dials, dsts []netip.AddrPort, prog *ebpf.Program) *datagramSender {
	b.Helper()
	s := &datagramSender{prog: prog, buf: make([]byte, 64)}
	for i, dst := range dsts {
		network := "udp4"
		if dst.Addr().Is6() {
			network = "udp6"
		}
		rx, err := testnet.ListenPacket(dstNS, network, dst.String())
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { rx.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				if _, _, err := rx.ReadFrom(buf); err != nil {
					return
				}
			}
		}()
		c, err := testnet.Dial(context.Background(), fromNS, network, dials[i].String())
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		s.conns = append(s.conns, c)
	}
	return s
}

// send sends n datagrams in bursts, each once the program has run for the
// ones before it: a burst never overflows the backlog of the node's
// receiving CPU, which would drop datagrams before the hook.
func (s *datagramSender) send(b *testing.B, n int) {
	b.Helper()
	const burst = 32
	start := progStats(b, []*ebpf.Program{s.prog})[0].RunCount
	for sent := 0; sent < n; {
		k := min(burst, n-sent)
		for range k {
			if _, err := s.conns[s.next].Write(s.buf); err != nil {
				b.Fatal(err)
			}
			s.next = (s.next + 1) % len(s.conns)
		}
		sent += k
		deadline := time.Now().Add(5 * time.Second)
		for progStats(b, []*ebpf.Program{s.prog})[0].RunCount-start < uint64(sent) {
			if time.Now().After(deadline) {
				b.Fatalf("%d datagrams sent, the program ran %d times in 5 s: datagrams lost before the hook", sent, progStats(b, []*ebpf.Program{s.prog})[0].RunCount-start)
			}
			runtime.Gosched()
		}
	}
}
