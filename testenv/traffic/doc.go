// Package traffic measures what the real agent costs the traffic it counts,
// and checks that it counts that traffic exactly.
//
// The topology (internal/testnet) is two nodes: node a (zone-a) with a client
// pod and node b (zone-b) with a server pod. Node a's namespace forwards the
// client's packets to the fabric: it is the router namespace, where the agent
// (the real binary, `kubezonnet agent --netns-path`) attaches its netfilter
// hooks and where an nftables counter for the client-to-server pair, one
// priority before the agent's hook, is the reference.
//
// Each case (Cases) runs in rounds of three runs of a fixed duration each
// (Modes, in an order that rotates from round to round: RoundModes):
// nothing attached at node a; an empty netfilter program (it
// accepts and returns) attached where and how the agent attaches its own,
// which shows what the kernel's hook costs whatever the program does; and
// the agent. The cases:
//
//   - TCP with offloads on and with offloads off: iperf3 (Debian), throughput
//     in Gbit/s as iperf3's receiver reports it. On is the veth defaults
//     (TSO and GSO on, GRO off); off is `ethtool -K tso off gso off gro off`
//     on both ends of every veth, switched between the cases. (testnet's
//     default, one segment per skb, makes TCP crawl at a few hundred
//     Mbit/s here: no measure of the datapath.)
//   - UDP with a 64-byte payload: one flow, 2,000 flows, and 32,000 new
//     flows per second (the flow set is replaced every second), from a
//     generator in this package run as a process of its own (cmd/udpgen,
//     see Generator: sendmmsg from one socket in the client pod, its thread
//     pinned to the last CPU, where the datagrams then cross the
//     namespaces in its softirqs).
//     A flow is a destination port: the datapath keys flows by the lower of
//     the two ports, and the generator sends from port 65535. The server pod
//     counts and drops the datagrams in an nftables rule at prerouting (no
//     socket per port, no ICMP port-unreachable back); the rate is what
//     arrived there, in kpps. A 1 s flush interval that straddles a
//     change of set sees the end of one and the start of the next: up to
//     twice 32,000 flows in one batch.
//
// With the agent, a run also measures the agent's CPU time (utime+stime over
// the traffic), its peak RSS (VmHWM), and its program's run count and run
// time from kernel.bpf_stats_enabled (held on by the benchmark while it
// runs), read from the program the agent's netfilter links point at. The
// setting is host-wide: while it is on, every BPF program on the host pays
// two clock reads per run (Options.NoBPFStats leaves it off).
//
// Exactness: the agent sends its remote-write to a receiver in this process
// (127.0.0.1), which decodes it with internal/wire. After the traffic, the
// agent is stopped with SIGTERM and its final drain received; the bytes and
// packets it reported for the client-to-server pair must equal the nftables
// counter at node a over the run (UDP). TCP sends GSO skbs: nftables counts
// one as a packet of skb->len while the agent counts wire segments (see the
// bpf package), so for TCP the bytes must equal the reference's plus one
// IPv4+TCP header (52 bytes, timestamps on) per segment beyond the skbs, and
// the packets the client's own count of segments sent (TcpOutSegs +
// TcpRetransSegs: OutSegs leaves retransmissions out), unless skbs were
// lost between the client and node a (its veth's TX drops): then the packets
// are reported as unchecked. With offloads off TCP sends one segment per
// skb here, and the check is nftables' count exactly. A run that is not
// exact is reported; Result.Exact is false and the command exits non-zero.
package traffic
