// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
//go:build ignore

/*
 * kubezonnet datapath: counts the bytes and packets that leave the pods (and
 * the host network) of this node, per flow, for billing-grade cross-zone
 * accounting.
 *
 * Layer counted: L3 bytes as they appear on the wire. Every IP packet is
 * counted with its own IP header, extension headers and L4 header. A GSO/TSO
 * super-packet (one skb standing for N wire segments) is counted as N packets
 * and len + (N-1) * (L3 + L4 header length) bytes, which is what the N
 * segments carry once the NIC or the GSO layer splits them. iph->tot_len is
 * never read: under BIG TCP it is 0. Link-layer framing (Ethernet header,
 * FCS, VLAN tags, tunnel encapsulation added after this hook) is not counted.
 *
 * Two entry points share one parser and one counting routine:
 *   - kzn_netfilter: BPF_PROG_TYPE_NETFILTER at NF_INET_POST_ROUTING, IPv4 and
 *     IPv6 (one link per family), priority below NAT so that the pre-SNAT pod
 *     address is seen. It sees forwarded pod traffic and host traffic.
 *   - kzn_cgroup_egress: cgroup_skb/egress on the cgroup v2 root, for
 *     dataplanes that bypass netfilter (Cilium eBPF host routing). It sees
 *     every socket's egress once, at the sender. With it, kzn_connect4|6
 *     and kzn_sendmsg4|6 record the destination each socket asked for,
 *     ahead of a socket load balancer that rewrites it (see sock_dsts).
 *
 * Lossless drain: flows are counted in one of two generations, each a flow
 * table region per CPU (see flow_table) and a per-CPU hash map, with a log
 * of records per CPU (see flow_log) for the flows a region has no room
 * for. Each CPU's `inflight` line says which generation is
 * in use. Every program instance announces itself in its CPU's counter
 * before it reads the generation and withdraws after its last write. User
 * space switches the generation on every CPU, then waits until it has
 * seen each CPU's counter at zero: from then on no program can still be
 * writing to the idle generation, which is then drained at leisure. (See account() for the
 * memory ordering.) This replaces an RCU grace period, which user space can
 * only wait for with a map-in-map update: a wait of its own on every drain,
 * a large share of the agent's flush budget.
 *
 * Nothing silent: a flow that cannot be inserted (map full, or the bucket lock
 * busy because this program interrupted itself on the same CPU) or a packet
 * that cannot be parsed is added, bytes and packets, to the per-CPU
 * `counters` array under its reason. Packets whose source is not local to
 * this node are not ours to count (the sending node counts them); they are
 * tallied under COUNTER_NOT_LOCAL for visibility only.
 */

#include "headers/kernel.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

char __license[] SEC("license") = "Dual MIT/GPL";

#define NF_ACCEPT 1
#define NFPROTO_IPV6 10
#define ETH_P_IPV6 0x86DD
#define SK_PASS 1

#define EEXIST 17
#define EBUSY 16
#define E2BIG 7

#define IPPROTO_HOPOPTS 0
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ROUTING 43
#define IPPROTO_FRAGMENT 44
#define IPPROTO_AH 51
#define IPPROTO_ICMPV6 58
#define IPPROTO_DSTOPTS 60

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* Conntrack: the status bit nf_nat sets when it rewrote a connection's
 * destination (IPS_DST_NAT_BIT), and the first enum ip_conntrack_info value
 * of the reply direction (IP_CT_IS_REPLY; the values from it up are
 * replies, IP_CT_UNTRACKED = 7 has no entry). */
#define IPS_DST_NAT (1 << 5)
#define IP_CT_IS_REPLY 3
#define NFCT_INFOMASK 7UL

/* Flags in flow_key.flags. */
enum flow_flag {
	/* Addresses are IPv6; otherwise IPv4-mapped (::ffff:a.b.c.d). */
	FLOW_F_IPV6 = 1,
	/* flow_key.port is the destination port (the packet goes to the
	 * service); otherwise it is the source port (the service answers). */
	FLOW_F_PORT_DST = 2,
	/* The packets are IP fragments: no L4 header, port is 0. */
	FLOW_F_FRAGMENT = 4,
	/* The connection was destination-NATed and the packets go in its
	 * original direction (netfilter), or a socket load balancer rewrote
	 * the socket's destination (cgroup_skb, see sock_dsts): orig_daddr
	 * and orig_port hold the destination the client addressed (a
	 * Service's virtual IP and port). Otherwise both are zero. */
	FLOW_F_ORIG_DST = 8,
};

/* One flow: who sent to whom, over which L4 protocol and service port, and
 * where the client addressed it before destination NAT. The client's
 * ephemeral port is left out on purpose so that a client opening many
 * connections to one service is one flow, not thousands.
 *
 * The netfilter program fills orig_daddr and orig_port from the packet's
 * conntrack entry. The cgroup_skb program fills them from the destination
 * the sending socket asked for in connect() or sendmsg() when a socket load
 * balancer rewrote it (see sock_dsts); it runs before the netfilter hooks
 * where kube-proxy's DNAT happens, so under kube-proxy it sees the virtual
 * IP as the destination itself and no backend, and reports none. */
struct flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 port; /* host byte order */
	__u8 proto;
	__u8 flags;
	__u16 orig_port; /* host byte order; 0 unless FLOW_F_ORIG_DST */
	__u16 pad;
	__u8 orig_daddr[16]; /* IPv4-mapped like saddr; 0 unless FLOW_F_ORIG_DST */
};

/* The bytes of a flow_key a table slot holds in its key: all but
 * orig_daddr (see table_slot). */
#define KEY_HEAD 40
_Static_assert(__builtin_offsetof(struct flow_key, orig_daddr) == KEY_HEAD,
	       "orig_daddr must follow the key's head");

/* Bytes (at the layer documented above) and packets of a flow. */
struct flow_stats {
	__u64 bytes;
	__u64 packets;
};

/* Local prefixes: a source is local when (saddr & mask) == addr for one
 * entry. IPv4 prefixes are stored IPv4-mapped (a /24 is a /120). A linear
 * scan of a few prefixes in an array measured faster than an LPM trie
 * lookup, and a node has a handful of prefixes (pod CIDRs, its addresses). */
#define MAX_LOCAL_PREFIXES 32

struct prefix {
	__u64 addr[2];
	__u64 mask[2];
};

/* One complete set of local prefixes. */
struct prefix_set {
	__u32 count;
	__u32 pad;
	struct prefix prefixes[MAX_LOCAL_PREFIXES];
};

/* The local prefixes: two sets, and which one is in use. User space writes
 * the idle set through its mapping of local_prefixes, then flips active
 * with an atomic store, so a program never sees a set that is half
 * written. */
struct prefix_state {
	__u32 active;
	__u32 pad;
	struct prefix_set sets[2];
};

/* Index into `counters`: what was not counted in a flow, and why. */
enum counter {
	/* The flow map was full: the flow could not be inserted. */
	COUNTER_MAP_FULL = 0,
	/* The flow map refused the insert for another reason (bucket busy
	 * because of same-CPU re-entry, out of memory). */
	COUNTER_MAP_ERROR = 1,
	/* The packet's IP or L4 header could not be read. */
	COUNTER_PARSE_ERROR = 2,
	/* Not a drop: the source is not local to this node, another node's
	 * agent counts it. */
	COUNTER_NOT_LOCAL = 3,
	/* A map lookup that cannot fail failed (never expected). */
	COUNTER_NO_MAP = 4,
	COUNTER_MAX = 5,
};

#define DEFAULT_MAX_FLOWS 65536

/* The template of a flow generation; max_entries is set at load time. */
struct flow_map {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct flow_key);
	__type(value, struct flow_stats);
	__uint(max_entries, DEFAULT_MAX_FLOWS);
};

struct flow_map flows_0 SEC(".maps");
struct flow_map flows_1 SEC(".maps");

/*
 * The flow table: where nearly every flow is counted. One BPF_F_MMAPABLE
 * array holds, for each of the two generations and each possible CPU, a
 * region of slots (an open-addressing hash table with linear probing, a
 * power of two slots long). A program only writes to its own CPU's region
 * of the active generation, with plain loads and stores: the array lookups and
 * bpf_get_smp_processor_id() are inlined by the verifier, so counting a
 * flow, new or known, makes no helper call. User space reads an idle
 * generation through a shared mapping of the array, without a syscall.
 * Flows that find no slot within TABLE_PROBES probes or no room in the
 * region (see log_line), and IPv6 flows whose original destination does
 * not start with the generation's prefix (see table_slot), go to the flow
 * log; programs that interrupted another on the same CPU go to the hash
 * map.
 *
 * Each region is allocated at the largest size user space may use (set at
 * load time, bounded by the agent's memory flag); how much of it a
 * generation uses is chosen by user space before each turn of that
 * generation, from the flows per CPU it has seen. The geometry (where the
 * region starts, the mask and hash shift of the slots in use) is kept in
 * each CPU's inflight line, which the program reads anyway: constants
 * from .rodata would cost a load each, and could not change.
 */

/* Benchmarks only: when set at load time, every run counts a new flow (a
 * run counter is folded into the destination). When 0, as it always is
 * outside the benchmark, the verifier removes the code: the production
 * program does not contain it (TestBenchHookCompiledOut checks). */
volatile const __u32 bench_new_flows = 0;
__u32 bench_seq;

/* Benchmarks only: when set at load time, the netfilter program does not
 * read the packet's conntrack entry and the cgroup_skb program does not
 * look up its socket's recorded destination, so no flow has an original
 * destination: the same program with and without the read, compared in one
 * run (BenchmarkNetfilterConntrack, BenchmarkCgroupSockLookup). 0 in the
 * agent. */
volatile const __u32 bench_no_conntrack = 0;

/* Benchmarks only: with bench_no_conntrack, a netfilter build that gives
 * every flow with a destination port the original destination
 * bench_orig (the key's orig_daddr words) and, as its port, the
 * destination port less bench_orig_port_delta, from the packet instead
 * of its conntrack entry. Through a Service whose ports map to the
 * backend's at that distance, its flows have the keys of the agent's
 * build, so both count in the same slots and the comparison is the read
 * alone (BenchmarkNetfilterConntrack/dnat). 0 in the agent. */
volatile const __u64 bench_orig[2] = {};
volatile const __u32 bench_orig_port_delta = 0;

#define TABLE_PROBES 8

/* A table slot. A slot is in use in a generation when its epoch equals
 * the generation's current epoch (see cpu_inflight), so a generation is
 * emptied by changing one number, not by clearing slots. Epoch 0 is never used:
 * a zeroed slot is free. 64 bytes: the array's values start page-aligned,
 * so every slot is exactly one cache line and counting a flow touches one
 * line (56-byte slots straddle two lines for most slots, which measured
 * slower on new flows).
 *
 * The key's original destination address does not fit in that line
 * whole. An IPv4 one takes the line's spare word, orig_daddr4. Of an IPv6
 * one, the line keeps the last word too, and the first 12 bytes are the
 * generation's IPv6 prefix in the CPU's inflight line (orig6): the first
 * flow of a generation with an IPv6 original destination sets it on that
 * CPU, and a later one whose address starts otherwise is counted in the
 * flow log. A Service CIDR of /96 or longer (Kubernetes' default IPv6
 * one is a /108) gives all of its virtual IPs one prefix, and a flow
 * through an IPv6 Service keeps to one line of the table, like every other
 * flow, reading a prefix from the line every packet reads anyway. The address
 * is written and compared only for a flow with FLOW_F_ORIG_DST (in the
 * head, with FLOW_F_IPV6), so a flow without one reads neither. */
struct table_slot {
	__u8 key[KEY_HEAD]; /* struct flow_key up to orig_daddr */
	__u32 epoch;
	/* Network byte order: the last word of orig_daddr, for
	 * FLOW_F_ORIG_DST flows (IPv4: the address). */
	__u32 orig_daddr4;
	struct flow_stats st;
};
_Static_assert(sizeof(struct table_slot) == 64, "a table slot is one cache line");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct table_slot);
	__uint(max_entries, 1); /* 2 generations * CPUs * slots per region, set at load */
} flow_table SEC(".maps");

/* The tags of the flow table's slots: one byte per slot, eight to an
 * element, at the slot's index. A tag is zero while its slot is free in
 * its generation's turn, and the flow's fingerprint (see fingerprint())
 * once a flow takes the slot. The program reads a slot's line only when
 * the slot's tag is the flow's fingerprint: a flow that is not in the
 * table, as every flow beyond the region's room is, costs the tags'
 * line, which a CPU's region keeps in 1/64 of the table's memory, and not
 * a line of the region, a cache miss per packet once the flows outgrow
 * the caches (BENCHMARKS.md, "Agent on real traffic"). The instance that
 * owns the table writes a tag with its slot; user space clears a
 * generation's tags while it is idle, with its geometry (see
 * cpu_inflight). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1); /* flow_table's entries / 8, set at load */
} flow_tags SEC(".maps");

/* Per CPU, in one cache line of its own: the program instances in flight
 * on this CPU, which generation is in use with the epoch of its table
 * slots (gen | epoch << 32), the geometry of this CPU's region in each
 * generation with the prefix of its IPv6 original destinations, and how
 * many flows this CPU counted in the hash map for want of room. User
 * space writes `active` and the geometry to every CPU's line, with atomic
 * stores through a shared mapping, and reads the counters the same way.
 * Keeping all of it in the CPU's line makes them one cache line per
 * packet.
 *
 * The geometry of a generation (shift, mask) and its IPv6 prefix change
 * only while that generation is idle and empty: user space sets the
 * geometry and clears the prefix just before it makes the generation
 * active (see account() for why no instance can be writing to it then);
 * within a turn, the instance that owns the table sets the prefix once.
 * base never changes: each generation's region is as long as the largest
 * size user space may give it. */
struct cpu_inflight {
	__u32 n;
	__u32 pad;
	__u64 active;   /* gen | epoch << 32 */
	__u32 base[2];  /* first slot of this CPU's region, per generation */
	__u32 mask[2];  /* slots in use - 1, per generation */
	__u16 shift[2]; /* 64 - log2(slots in use), per generation */
	/* Flows this CPU counted in the hash map for the first time in a
	 * generation because neither the table nor the log took them (once
	 * per CPU per generation; not nested instances, which always go
	 * there). Cumulative, wrapping; only the instance that owns the
	 * table writes it, so a plain add. */
	__u32 spilled;
	/* Per generation, the first 12 bytes of the IPv6 original
	 * destinations in this CPU's table slots (see table_slot); all zero
	 * until a flow sets them. */
	__u32 orig6[2][3];
};
_Static_assert(sizeof(struct cpu_inflight) == 64, "a CPU's line is one cache line");

/* The lines of all CPUs, indexed by CPU number. A global array, not an
 * array map: its address is a constant in the program, so finding this
 * CPU's line is a shift and an add. A map lookup would pass the CPU number
 * through the stack (the helper's key is a pointer) and cost a store, a
 * dependent load and a bounds check in front of every later access: with
 * local_prefixes below, a visible share of an existing flow's cost
 * (Netfilter, BENCHMARKS.md). MAX_CPUS is the largest NR_CPUS any kernel
 * is built with, so every possible CPU has a line: 512 KiB of .bss (which
 * takes no room in the object file, and which user space maps). */
#define MAX_CPUS 8192
struct cpu_inflight inflight[MAX_CPUS] __attribute__((aligned(64)));

/*
 * The flow log: where a CPU's observations go, one record each, once its
 * table region of the generation in use holds as many flows as it has
 * room for (half its slots in use, see log_line). Counting a flow in the
 * table costs one line of the table per packet, and once the flows of an
 * interval outgrow the caches that line is a cache miss and often a TLB
 * miss: hundreds of nanoseconds a packet at 32,000 new flows a second on
 * a CPU (BENCHMARKS.md, "Agent on real traffic"). The log is written in
 * order: the processor fetches its lines ahead of the writes, and a page
 * holds 64 records, so many flows cost about what few do. User space
 * reads it every few milliseconds and adds the records up. The table
 * keeps the flows that come first in an interval, which tend to be those
 * that send the most.
 *
 * One BPF_F_MMAPABLE array holds a ring of 1 << log_shift records per
 * possible CPU (set at load). Only the instance that owns the table
 * writes its CPU's ring: it writes a record at head, then advances head
 * with a fully ordered atomic, so user space, which loads head before it
 * reads the records below it, reads whole records. User space stores tail
 * once it has read them. A ring without room for a record sends it to the
 * hash map.
 */
struct log_rec {
	__u8 key[sizeof(struct flow_key)];
	__u32 bytes;
	__u32 packets;
};
_Static_assert(sizeof(struct log_rec) == 64, "a log record is one cache line");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct log_rec);
	__uint(max_entries, 1); /* CPUs << log_shift, set at load */
} flow_log SEC(".maps");

/* log2 of the records in each CPU's ring: set at load. */
volatile const __u32 log_shift = 6;

/* Per CPU, in a line of its own, read when a flow is not in the table:
 * the ring's positions, and how many more flows the table may take in
 * each generation. The room keeps a region at most half full, where
 * linear probing nearly always finds a flow, or a free slot, at once;
 * user space sets it with the geometry before a generation's turn (see
 * cpu_inflight) and reads what is left to size the next turn. */
struct log_line {
	__u32 head;    /* records written, cumulative, wrapping */
	__u32 tail;    /* records user space has read, cumulative, wrapping */
	__u32 room[2]; /* per generation */
	__u32 pad[12];
};
_Static_assert(sizeof(struct log_line) == 64, "a CPU's log line is one cache line");

struct log_line logs[MAX_CPUS] __attribute__((aligned(64)));

/* The hash maps of the two generations, at their generation's index, set
 * once at load. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 2);
	__type(key, __u32);
	__array(values, struct flow_map);
} flow_maps SEC(".maps");

/* The prefixes of this node's sources (pod CIDRs and node addresses). A
 * global, not a one-entry array map, for the reason given at inflight: no
 * lookup at all. */
struct prefix_state local_prefixes __attribute__((aligned(64)));

/* Cumulative per-CPU counters, indexed by enum counter. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct flow_stats);
	__uint(max_entries, COUNTER_MAX);
} counters SEC(".maps");

/* The destination a socket asked for: in connect() for a connected socket,
 * in its last sendmsg() with an address for an unconnected UDP one. The
 * address IPv4-mapped like flow_key's; port in host byte order. */
struct sock_dst {
	__u64 addr[2];
	__u32 port;
	__u32 pad;
};

/*
 * sock_dsts holds, per socket, the destination the application asked for,
 * recorded by the cgroup/connect and cgroup/sendmsg programs before a
 * socket load balancer (Cilium's kube-proxy replacement) rewrites a
 * Service's virtual IP and port to a backend's. Those rewrites happen in
 * the socket layer, before any packet exists and without conntrack, so
 * this is the only place the virtual IP is still seen. Socket-local
 * storage: freed with the socket, no size to choose, no key to build.
 *
 * Our programs must run before the balancer's: see AttachCgroup (attach.go)
 * for the kernel's ordering of cgroup programs and how it is obtained.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_dst);
} sock_dsts SEC(".maps");

/* Force BTF for the types user space needs (bpf2go -type). */
const enum counter *unused_counter __attribute__((unused));
const enum flow_flag *unused_flow_flag __attribute__((unused));

static __always_inline void add_counter(__u32 idx, __u64 bytes, __u64 packets)
{
	struct flow_stats *c = bpf_map_lookup_elem(&counters, &idx);

	if (c) {
		/* Atomic even though per-CPU: a softirq can interrupt this
		 * program on the same CPU and run it again. */
		__sync_fetch_and_add(&c->bytes, bytes);
		__sync_fetch_and_add(&c->packets, packets);
	}
}

/* account_hash adds one observation to generation gen's hash map, and
 * never loses it silently. It returns 1 when the flow had no count on this
 * CPU yet in this generation (a new flow for the table's sizing, see
 * cpu_inflight), 0 otherwise. */
static __always_inline int account_hash(__u32 gen, struct flow_key *key, __u64 bytes,
					__u64 packets)
{
	struct flow_stats *st;
	void *flows;
	long err;
	int fresh;

	flows = bpf_map_lookup_elem(&flow_maps, &gen);
	if (!flows) {
		add_counter(COUNTER_NO_MAP, bytes, packets);
		return 0;
	}
	st = bpf_map_lookup_elem(flows, key);
	if (st) {
		/* This CPU's value: zero until this CPU counts the flow (an
		 * insert by another CPU zeroes every CPU's value but its
		 * own). */
		fresh = st->packets == 0;
		__sync_fetch_and_add(&st->bytes, bytes);
		__sync_fetch_and_add(&st->packets, packets);
		return fresh;
	}
	struct flow_stats init = { .bytes = bytes, .packets = packets };
	err = bpf_map_update_elem(flows, key, &init, BPF_NOEXIST);
	if (!err)
		return 1;
	if (err == -EEXIST) {
		/* Inserted concurrently (same CPU, nested): add to it. */
		st = bpf_map_lookup_elem(flows, key);
		if (st) {
			__sync_fetch_and_add(&st->bytes, bytes);
			__sync_fetch_and_add(&st->packets, packets);
			return 1;
		}
	}
	add_counter(err == -E2BIG ? COUNTER_MAP_FULL : COUNTER_MAP_ERROR, bytes, packets);
	/* Not counted in a flow, but a flow the table lacked room for. */
	return 1;
}

/* slot_hash spreads flow keys over a table region: multiply-xor of the
 * key's 64-bit words, whose top bits make the slot (the top bits of a
 * product depend on every bit of its input; the bottom ones do not).
 * The key must be 8-byte aligned (see parse_count). Addresses are folded
 * before the multiply: for IPv4 one of the words is zero, and the
 * addresses of one family rarely differ in both halves.
 *
 * Only what the packet's headers give is hashed (addresses, port,
 * protocol), not the flags nor the original destination, which come
 * from the conntrack entry: so the addresses of the flow's tag and slot
 * do not wait for the entry's loads, and the processor reads the table
 * while it reads the entry (what that saves a Service's packet:
 * BenchmarkNetfilterConntrack, BENCHMARKS.md). Two flows that differ
 * only in their original destination share a probe path; while
 * conntrack keeps a connection, no other has its tuple after NAT, so
 * they are rare. */
static __always_inline __u64 slot_hash(const struct flow_key *key)
{
	const __u64 *w = (const __u64 *)key;
	__u64 h = (w[0] ^ w[1]) * 0x9E3779B97F4A7C15ULL;

	h ^= (w[2] ^ w[3]) * 0xC2B2AE3D27D4EB4FULL;
	h ^= (w[4] & 0xffffff) * 0x165667B19E3779F9ULL;
	return h;
}

/* fingerprint is the tag of a flow with this hash: seven bits of it mixed
 * again (the slot is the hash's top bits, and the bits below those depend
 * on few of the key's: an IPv4 address's last byte is the top of its
 * word), with the top bit set, as a used slot's tag is never zero. */
static __always_inline __u32 fingerprint(__u64 hash)
{
	return (((hash ^ (hash >> 32)) * 0x9E3779B97F4A7C15ULL) >> 57) | 0x80;
}

/* tag_of is the tag byte of flow_table's slot idx, or NULL when idx is
 * beyond the table. */
static __always_inline __u8 *tag_of(__u32 idx)
{
	__u32 e = idx >> 3;
	__u8 *t = bpf_map_lookup_elem(&flow_tags, &e);

	return t ? t + (idx & 7) : NULL;
}

/* same_head compares a slot's key head with a key's (8-byte aligned):
 * everything but orig_daddr, which only FLOW_F_ORIG_DST flows have. */
static __always_inline int same_head(const __u8 *head, const struct flow_key *b)
{
	const __u64 *x = (const __u64 *)head, *y = (const __u64 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) |
		(x[4] ^ y[4])) == 0;
}

/* orig_daddr4 is the last word of a key's original destination address:
 * for IPv4 (IPv4-mapped), the address. */
static __always_inline __u32 orig_daddr4(const struct flow_key *key)
{
	return ((const __u32 *)key->orig_daddr)[3];
}

/* same_orig6 reports whether the first 12 bytes of the key's original
 * destination address are generation g's IPv6 prefix on this CPU (fl). */
static __always_inline int same_orig6(const struct cpu_inflight *fl, __u32 g,
				      const struct flow_key *key)
{
	const __u32 *p = fl->orig6[g], *k = (const __u32 *)key->orig_daddr;

	return ((p[0] ^ k[0]) | (p[1] ^ k[1]) | (p[2] ^ k[2])) == 0;
}

/* same_flow reports whether the slot holds key, in generation g on this
 * CPU (fl). The head is compared first: its flags say whether there is an
 * original destination, and where its first 12 bytes are. */
static __always_inline int same_flow(const struct table_slot *slot,
				     const struct cpu_inflight *fl, __u32 g,
				     const struct flow_key *key)
{
	if (!same_head(slot->key, key))
		return 0;
	if (!(key->flags & FLOW_F_ORIG_DST))
		return 1;
	if (slot->orig_daddr4 != orig_daddr4(key))
		return 0;
	return !(key->flags & FLOW_F_IPV6) || same_orig6(fl, g, key);
}

/* put_orig stores key's original destination, when it has one, for a slot
 * of generation g on this CPU (fl): the last word in the slot and, for
 * IPv6, the first 12 bytes as the generation's prefix, which the first
 * such flow sets. It returns 0, and stores nothing, for an IPv6 address
 * with another prefix than the generation's, or with a zero one (which
 * would read as no prefix set): that flow is counted in the flow log. */
static __always_inline int put_orig(struct table_slot *slot, struct cpu_inflight *fl,
				    __u32 g, const struct flow_key *key)
{
	const __u32 *k = (const __u32 *)key->orig_daddr;
	__u32 *p;

	if (!(key->flags & FLOW_F_ORIG_DST))
		return 1;
	if (key->flags & FLOW_F_IPV6) {
		p = fl->orig6[g];
		if (p[0] | p[1] | p[2]) {
			if (!same_orig6(fl, g, key))
				return 0;
		} else {
			if (!(k[0] | k[1] | k[2]))
				return 0;
			p[0] = k[0];
			p[1] = k[1];
			p[2] = k[2];
		}
	}
	slot->orig_daddr4 = k[3];
	return 1;
}

/* log_flow appends one observation to this CPU's ring of the flow log,
 * and returns 0, writing nothing, when the ring is full or the bytes do
 * not fit a record. Only the instance that owns the table calls it, with
 * a CPU number account() has checked against MAX_CPUS. */
static __always_inline int log_flow(__u32 cpu, const struct flow_key *key, __u64 bytes,
				    __u64 packets)
{
	struct log_line *ll = &logs[cpu];
	__u32 head = ll->head, len = 1U << log_shift, idx, done;
	struct log_rec *r;

	if (head - *(volatile __u32 *)&ll->tail >= len || bytes > 0xffffffffULL)
		return 0;
	idx = (cpu << log_shift) + (head & (len - 1));
	r = bpf_map_lookup_elem(&flow_log, &idx);
	if (!r)
		return 0;
	__builtin_memcpy(r->key, key, sizeof(*key));
	r->bytes = bytes;
	r->packets = packets;
	/* Fully ordered (the fetch form, see account()): the record's stores
	 * are visible before the new head. */
	done = __sync_fetch_and_add(&ll->head, 1);
	asm volatile("" : : "r"(done));
	return 1;
}

/*
 * account adds one observation to the active generation: in this CPU's
 * region of the flow table when the flow is there, or a free slot is
 * found within TABLE_PROBES and the region has room, in the flow log
 * otherwise, and in the hash map when the log is full. Linear probing never
 * frees a slot within a generation, so a free slot on the probe path
 * proves the flow is not further along.
 *
 * The drain protocol, and why it is safe:
 *  - The instance increments its CPU's inflight counter before it reads
 *    the CPU's active generation, and decrements it after its last write.
 *    Both are BPF_FETCH atomics, which the kernel's JITs emit fully
 *    ordered (x86: lock xadd; arm64: ldaddal, or an LL/SC loop with dmb
 *    ish): the read of `active` cannot move before the increment, nor a
 *    write after the decrement.
 *    (The result of the decrement is consumed so that clang emits the
 *    fetch form: the plain atomic add is relaxed on arm64.)
 *  - User space stores each CPU's `active`, then loads each counter, with
 *    Go's sequentially consistent atomics. If it loads zero, every instance
 *    that read the old generation has already decremented: its writes
 *    are visible. Any instance that increments later reads the new
 *    generation. Counters are per CPU and a program does not migrate, so
 *    an instance's decrement hits the counter of its increment.
 *  - Only the instance that found the counter at zero uses the table:
 *    one that interrupted another on this CPU (a softirq), or started
 *    while another is preempted (process context on a preemptible kernel),
 *    goes to the hash map, whose updates are atomic. The table region needs
 *    no atomics because it has one writer at a time.
 *
 * What happens between the two atomics is paid in full: they are full
 * barriers, so the processor cannot overlap it with the work before or
 * after. So the lookup of an existing flow is done before the increment,
 * and only its two additions after. That lookup is safe without the
 * counter because of what can change meanwhile:
 *  - A slot in use holds its key for as long as its generation keeps its
 *    epoch: the table's writer only takes free slots, and user space
 *    never writes the table. (The slot's tag, which says whether to read
 *    the slot at all, is only a hint: a tag that reads as the flow's
 *    when it is not, or a slot whose epoch is not that of `active`, and
 *    the flow is not taken as known.)
 *  - Epochs are never reused: the drain gives a generation a new one each
 *    time it is reactivated, so `active` never takes the same value twice.
 *  So if, before the increment, the slot held this key in the epoch of
 *  `active`, and `active` is the same after the increment, the slot
 *  still holds this key. Only its counts may have changed (an instance
 *  that interrupted this one before its increment, and took the table),
 *  and the counts are read after the increment. If `active` changed (a
 *  drain in between), the probe starts over in the new generation.
 *  Doing the lookup before the increment rather than after makes an
 *  existing flow cheaper (builds compared with BenchmarkNetfilterObjects,
 *  BENCHMARKS.md).
 *
 * The geometry of a generation (shift[g], mask[g]) is read after `active`,
 * for the generation `active` names, and its loads depend on it (the
 * generation is their index): user space stores a generation's geometry
 * before the `active` that names it, so an instance that sees the new
 * `active` sees the geometry stored for it (x86 keeps loads in order; on
 * arm64 the address dependency orders them). User space changes a
 * generation's geometry only while no instance writes to that
 * generation: just before it makes it active again, which follows the
 * drain of that generation, which followed the wait for every instance
 * that could still write to it. So:
 *  - An instance that writes to the table read `active` after its
 *    increment, and the geometry after that: it is the geometry of the
 *    generation it writes to, and stays so until a drain has waited for
 *    this instance to finish.
 *  - The lookup before the increment may read a generation whose
 *    geometry is being changed (an instance that loaded `active` before
 *    the generation was switched away and back), and so a mask and shift
 *    that do not belong together. It only reads: every mask is below the
 *    region's length, so the slot read is in the CPU's region, and
 *    `active` after the increment differs from the `active` it read
 *    (a generation comes back with a new epoch), so the slot is neither
 *    trusted nor written. The probe then recomputes the slot with the
 *    geometry of the generation it writes to.
 */
static __always_inline void account(struct flow_key *key, __u64 bytes, __u64 packets)
{
	__u32 cpu, mask, h, ep, gen, nested, left, idx, g, fp, t, *room;
	struct table_slot *slot;
	__u8 *tag;
	struct cpu_inflight *fl;
	__u64 seen, active, hash;
	int known;

	if (bench_new_flows) {
		__u32 *d = (__u32 *)key->daddr;

		d[3] ^= bench_seq++;
	}
	cpu = bpf_get_smp_processor_id();
	if (cpu >= MAX_CPUS) {
		/* Never: user space refuses to load on a larger machine. */
		add_counter(COUNTER_NO_MAP, bytes, packets);
		return;
	}
	fl = &inflight[cpu];
	/* Before the increment: find the flow's first slot in the generation
	 * in use, and whether the flow is already there (see above). */
	hash = slot_hash(key);
	seen = *(volatile __u64 *)&fl->active;
	g = seen & 1;
	mask = fl->mask[g];
	h = hash >> fl->shift[g];
	idx = fl->base[g] + (h & mask);
	tag = tag_of(idx);
	fp = fingerprint(hash);
	slot = NULL;
	known = 0;
	if (tag && *tag == fp) {
		slot = bpf_map_lookup_elem(&flow_table, &idx);
		known = slot && slot->epoch == (__u32)(seen >> 32) && same_flow(slot, fl, g, key);
	}

	nested = __sync_fetch_and_add(&fl->n, 1);
	active = *(volatile __u64 *)&fl->active;
	gen = active & 1;
	if (nested)
		goto hash;
	if (known && active == seen && slot) { /* slot: for the verifier */
		/* The common case: a flow already counted. */
		slot->st.bytes += bytes;
		slot->st.packets += packets;
		goto out;
	}
	if (active != seen) {
		/* A drain switched generations since the lookup: the geometry
		 * of the one in use now (see above). */
		mask = fl->mask[gen];
		h = hash >> fl->shift[gen];
	}
	ep = active >> 32;
	room = &logs[cpu].room[gen];
#pragma clang loop unroll(disable)
	for (int i = 0; i < TABLE_PROBES; i++) {
		idx = fl->base[gen] + ((h + i) & mask);
		tag = tag_of(idx);
		if (!tag)
			break;
		t = *tag;
		if (t && t != fp)
			continue; /* another flow's */
		if (!t && !*room)
			break; /* free, and no room: the slot's line is not read */
		slot = bpf_map_lookup_elem(&flow_table, &idx);
		if (!slot)
			break;
		if (slot->epoch != ep) {
			/* Free in this generation (a tag of another turn
			 * that an instance a drain gave up waiting for wrote
			 * late, see setSlots, reads as the tag of a free
			 * slot): the flow takes it, if the region has room,
			 * and unless its IPv6 original destination has
			 * another prefix. */
			if (!*room || !put_orig(slot, fl, gen, key))
				break;
			__builtin_memcpy(slot->key, key, KEY_HEAD);
			slot->st.bytes = bytes;
			slot->st.packets = packets;
			slot->epoch = ep;
			*tag = fp;
			(*room)--;
			goto out;
		}
		if (same_flow(slot, fl, gen, key)) {
			slot->st.bytes += bytes;
			slot->st.packets += packets;
			goto out;
		}
	}
	/* No room in the region, no slot within TABLE_PROBES, or an IPv6
	 * original destination of another prefix: a record in the log. */
	if (log_flow(cpu, key, bytes, packets))
		goto out;
hash:
	/* Nested, or the log full: counted in the hash map. A flow the log had
	 * no room for counts once per generation in this CPU's spills; a
	 * nested instance leaves the line's counts to the instance it
	 * interrupted, their only writer. */
	if (account_hash(gen, key, bytes, packets) && !nested)
		fl->spilled++;
out:
	left = __sync_fetch_and_add(&fl->n, -1);
	asm volatile("" : : "r"(left));
}

/* is_local reports whether the source belongs to this node. */
static __always_inline int is_local(const struct flow_key *key)
{
	const __u64 *a = (const __u64 *)key->saddr;
	/* The set's address depends on the load of active, which orders the
	 * two loads (on arm64 too) after user space's store of active,
	 * itself after the set was written. */
	struct prefix_set *set = &local_prefixes.sets[local_prefixes.active & 1];
	for (__u32 i = 0; i < MAX_LOCAL_PREFIXES; i++) {
		struct prefix *p;

		if (i >= set->count)
			break;
		p = &set->prefixes[i];
		if ((a[0] & p->mask[0]) == p->addr[0] && (a[1] & p->mask[1]) == p->addr[1])
			return 1;
	}
	return 0;
}

/* Where the parser reads headers from. */
enum hdr_src {
	/* Kernel memory (the skb's linear area, or a copy on the stack),
	 * read through bpf_rdonly_cast(): plain loads, no helper call. */
	SRC_CAST,
	/* Direct packet access between data and data_end (cgroup_skb). */
	SRC_PKT,
};

/* The packet as the parser sees it, starting at the IP header. */
struct pkt {
	void *base;
	void *end;   /* SRC_PKT */
	__u32 avail; /* SRC_CAST: readable bytes from base */
};

/* HDR is a pointer to the header struct T at offset off from the IP
 * header, or NULL when it is not entirely readable. */
#define HDR(p, src, T, off)                                                              \
	((src) == SRC_PKT ?                                                              \
		 ((p)->base + (off) + sizeof(struct T) <= (p)->end ?                     \
			  (struct T *)((p)->base + (off)) :                               \
			  NULL) :                                                        \
		 ((off) + sizeof(struct T) <= (p)->avail ?                               \
			  (struct T *)bpf_rdonly_cast((p)->base + (off),                  \
						      bpf_core_type_id_kernel(struct T)) : \
			  NULL))

/* RAW views the header at ptr, known readable for at least 16 bytes, as 16
 * plain bytes, so that it can be read in 64- and 32-bit words across field
 * boundaries: the verifier allows a load from a kernel type only within
 * one field, or within an array; struct in6_addr is a 16-byte array. */
#define RAW(src, ptr)                                                                    \
	((src) == SRC_PKT ?                                                              \
		 (void *)(ptr) :                                                         \
		 (void *)bpf_rdonly_cast((ptr), bpf_core_type_id_kernel(struct in6_addr)))

/* RAWHDR is RAW of the header T at offset off, or NULL when T is not
 * entirely readable: one cast where HDR then RAW would be two (a cast
 * is a call to the compiler, which keeps fewer values in registers
 * across it). Only for headers read within their first 16 bytes. */
#define RAWHDR(p, src, T, off)                                                           \
	((src) == SRC_PKT ?                                                              \
		 ((p)->base + (off) + sizeof(struct T) <= (p)->end ?                     \
			  (void *)((p)->base + (off)) :                                   \
			  NULL) :                                                        \
		 ((off) + sizeof(struct T) <= (p)->avail ?                               \
			  (void *)bpf_rdonly_cast((p)->base + (off),                      \
						  bpf_core_type_id_kernel(struct in6_addr)) : \
			  NULL))

/* Where the GSO metadata comes from. */
enum gso_src {
	GSO_SHINFO, /* skb_shinfo() of a struct sk_buff (netfilter) */
	GSO_CTX,    /* the struct __sk_buff context (cgroup_skb) */
};

struct gso {
	__u32 segs, size;
};

/* read_gso returns the packet's GSO segment count and size (0 when it is
 * not a GSO packet). It is called where they are needed, not at entry:
 * fewer values live across the parse are fewer spills. */
static __always_inline struct gso read_gso(void *skbp, const int from)
{
	struct gso g;

	if (from == GSO_CTX) {
		struct __sk_buff *skb = skbp;

		g.segs = skb->gso_segs;
		g.size = skb->gso_size;
	} else if (bpf_core_field_offset(struct skb_shared_info, gso_segs) ==
		   bpf_core_field_offset(struct skb_shared_info, gso_size) + 2) {
		/* skb_shinfo(skb) is head + end (an offset on 64-bit
		 * kernels). Its two fields side by side, as in every kernel
		 * so far: one guarded load instead of two (the other branch
		 * is removed at load). */
		struct sk_buff *skb = skbp;
		void *raw = RAW(SRC_CAST, skb->head + skb->end +
					  bpf_core_field_offset(struct skb_shared_info, gso_size));
		__u32 w = *(__u32 *)raw;

		g.size = w & 0xffff;
		g.segs = w >> 16;
	} else {
		struct sk_buff *skb = skbp;
		struct skb_shared_info *shinfo =
			bpf_rdonly_cast(skb->head + skb->end,
					bpf_core_type_id_kernel(struct skb_shared_info));

		g.segs = shinfo->gso_segs;
		g.size = shinfo->gso_size;
	}
	return g;
}

/* packets_of is how many packets a packet stands for, for the counters. */
static __always_inline __u32 packets_of(struct gso g)
{
	return g.segs > 1 ? g.segs : 1;
}

/*
 * orig_dst writes to key->orig_daddr the destination address the packet's
 * connection was addressed to before destination NAT, and returns that
 * destination's port field (host byte order), when there is one: the
 * packet has a conntrack entry, the entry's destination was rewritten
 * (IPS_DST_NAT, set by nf_nat only when the address or port changed) and
 * the packet travels in the connection's original direction. The
 * original-direction tuple's destination is what the client sent to (a
 * Service's virtual IP and port under kube-proxy). A reply (the backend
 * answering, in the reply direction), a connection nothing rewrote and an
 * untracked packet (no entry: IP_CT_UNTRACKED with a NULL pointer) have
 * none: it returns -1 and leaves orig_daddr zero.
 *
 * Plain guarded loads, no helper call: the entry's fields are located by
 * CO-RE and read through bpf_rdonly_cast(), which the verifier inlines.
 * The entry was just used by conntrack and NAT on this packet, so its
 * lines are in the cache. A kernel without conntrack has no _nfct: the
 * read is removed at load. dport (the packet's destination port) serves
 * only the benchmark build of bench_orig.
 */
static __always_inline int orig_dst(struct sk_buff *skb, struct flow_key *key, int ipv6,
				    __u16 dport)
{
	__u64 *o = (__u64 *)key->orig_daddr;
	unsigned long nfct;
	void *ct, *u3;

	o[0] = 0;
	o[1] = 0;
	if (bench_no_conntrack) {
		if (!bench_orig_port_delta || !dport)
			return -1;
		o[0] = bench_orig[0];
		o[1] = bench_orig[1];
		return (__u16)(dport - bench_orig_port_delta);
	}
	if (!bpf_core_field_exists(skb->_nfct) ||
	    !bpf_core_field_exists(struct nf_conn, status))
		return -1;
	nfct = skb->_nfct;
	ct = (void *)(nfct & ~NFCT_INFOMASK);
	if (!ct || (nfct & NFCT_INFOMASK) >= IP_CT_IS_REPLY)
		return -1;
	/* status is an unsigned long: its low word (little-endian). */
	if (!(*(__u32 *)RAW(SRC_CAST, ct + bpf_core_field_offset(struct nf_conn, status)) &
	      IPS_DST_NAT))
		return -1;
	u3 = RAW(SRC_CAST, ct + bpf_core_field_offset(struct nf_conn, tuplehash[0].tuple.dst.u3));
	if (ipv6) {
		o[0] = *(__u64 *)u3;
		o[1] = *(__u64 *)(u3 + 8);
	} else {
		/* IPv4-mapped, as the key's addresses. */
		o[1] = (__u64)*(__u32 *)u3 << 32 | 0xffff0000;
	}
	return bpf_ntohs(*(__u16 *)RAW(SRC_CAST, ct + bpf_core_field_offset(
							     struct nf_conn, tuplehash[0].tuple.dst.u.all)));
}

/*
 * sock_orig_dst writes to key->orig_daddr the destination the packet's
 * socket asked for, and returns its port, when a socket load balancer
 * rewrote it: the socket has a recorded destination (sock_dsts) and it
 * differs from the packet's, in address or port. A packet to the
 * destination asked for, one without a full socket (the helper checks) and
 * one of a socket nothing recorded (accepted connections, sockets that
 * connected before the agent attached) have none: it returns -1 and leaves
 * orig_daddr zero. One helper call, no insert.
 */
static __always_inline int sock_orig_dst(struct __sk_buff *skb, struct flow_key *key, int ipv6,
					 __u16 dport)
{
	__u64 *o = (__u64 *)key->orig_daddr, *kd = (__u64 *)key->daddr;
	struct bpf_sock *sk = skb->sk;
	struct sock_dst *d;

	o[0] = 0;
	o[1] = 0;
	if (bench_no_conntrack || !sk)
		return -1;
	d = bpf_sk_storage_get(&sock_dsts, sk, 0, 0);
	if (!d)
		return -1;
	if (d->addr[0] == kd[0] && d->addr[1] == kd[1] && d->port == dport)
		return -1;
	/* An IPv4 packet's original destination is IPv4 too (the table keeps
	 * one word of it, see table_slot): an IPv6 address the balancer
	 * turned into an IPv4 one is not reported. */
	if (!ipv6 && (d->addr[0] != 0 || (__u32)d->addr[1] != 0xffff0000))
		return -1;
	o[0] = d->addr[0];
	o[1] = d->addr[1];
	return d->port;
}

#define PARSED 0
#define UNREADABLE -1 /* headers beyond what p covers: retry on a copy */
#define MALFORMED -2

/*
 * parse_count parses the L3 packet at p and accounts for it. len is the
 * skb length; the GSO metadata is read from skb (see read_gso) once the
 * source is known to be local. It counts nothing unless it returns
 * PARSED.
 */
static __always_inline int parse_count(struct pkt *p, const int src, int ipv6, __u32 len,
				       void *skb, const int gso_from)
{
	struct gso g;
	/* 8-byte aligned: slot_hash and same_key read it in 64-bit words.
	 * Not zeroed first: every word of it is written below. */
	struct flow_key key __attribute__((aligned(8)));
	__u64 *ks = (__u64 *)key.saddr, *kd = (__u64 *)key.daddr;
	__u32 l3len, l4len = 0, segs, flags = 0, port = 0;
	__u64 extra, orig_port = 0;
	int has_l4 = 1, has_ports = 0, op = -1;
	__u16 dport = 0;
	__u8 proto;

	/* Headers are read in 64- and 32-bit words where fields sit side by
	 * side (the object is little-endian only, see gen.go): in the
	 * netfilter program every load from the packet is a guarded load
	 * (BPF_PROBE_MEM, eight x86 instructions), so fewer loads are fewer
	 * instructions (not measurably faster on their own: see
	 * BENCHMARKS.md). */
	if (!ipv6) {
		struct iphdr *ip = HDR(p, src, iphdr, 0);
		void *raw;
		__u64 w0, w1;

		if (!ip)
			return UNREADABLE;
		raw = RAW(src, ip);
		w0 = *(__u64 *)raw;         /* version, ihl ... frag_off */
		w1 = *(__u64 *)(raw + 8);   /* ttl, protocol, check, saddr */
		if ((w0 & 0xf0) != 0x40)
			return MALFORMED;
		l3len = (w0 & 0x0f) * 4;
		if (l3len < sizeof(*ip))
			return MALFORMED;
		proto = w1 >> 8;
		ks[0] = 0;
		kd[0] = 0;
		/* IPv4-mapped: ::ffff:a.b.c.d, the address in the top half. */
		ks[1] = (w1 & 0xffffffff00000000ULL) | 0xffff0000;
		kd[1] = (__u64)ip->daddr << 32 | 0xffff0000;
		if ((w0 >> 48) & bpf_htons(IP_MF | IP_OFFSET)) {
			flags |= FLOW_F_FRAGMENT;
			has_l4 = 0;
		}
	} else {
		struct ipv6hdr *ip6 = HDR(p, src, ipv6hdr, 0);
		__u64 w0;

		if (!ip6)
			return UNREADABLE;
		w0 = *(__u64 *)RAW(src, ip6); /* version ... nexthdr, hop_limit */
		if ((w0 & 0xf0) != 0x60)
			return MALFORMED;
		flags |= FLOW_F_IPV6;
		ks[0] = *(__u64 *)((void *)ip6 + 8);
		ks[1] = *(__u64 *)((void *)ip6 + 16);
		kd[0] = *(__u64 *)((void *)ip6 + 24);
		kd[1] = *(__u64 *)((void *)ip6 + 32);
		proto = w0 >> 48;
		l3len = sizeof(*ip6);
		/* Walk a bounded number of extension headers (none for
		 * nearly every packet: tested first). */
#pragma unroll
		for (int i = 0; i < 4 && proto != IPPROTO_TCP && proto != IPPROTO_UDP; i++) {
			if (proto == IPPROTO_FRAGMENT) {
				struct frag_hdr *fh = HDR(p, src, frag_hdr, l3len);

				if (!fh)
					return UNREADABLE;
				flags |= FLOW_F_FRAGMENT;
				has_l4 = 0;
				proto = fh->nexthdr;
				l3len += sizeof(*fh);
			} else if (proto == IPPROTO_HOPOPTS || proto == IPPROTO_ROUTING ||
				   proto == IPPROTO_DSTOPTS || proto == IPPROTO_AH) {
				struct ipv6_opt_hdr *eh = HDR(p, src, ipv6_opt_hdr, l3len);

				if (!eh)
					return UNREADABLE;
				l3len += proto == IPPROTO_AH ? ((__u32)eh->hdrlen + 2) * 4 :
							       ((__u32)eh->hdrlen + 1) * 8;
				proto = eh->nexthdr;
			} else {
				break;
			}
		}
	}

	if (!is_local(&key)) {
		add_counter(COUNTER_NOT_LOCAL, len, packets_of(read_gso(skb, gso_from)));
		return PARSED;
	}

	g = read_gso(skb, gso_from);
	if (has_l4 && (proto == IPPROTO_TCP || proto == IPPROTO_UDP)) {
		__u16 sport;
		__u32 ports;

		if (proto == IPPROTO_TCP) {
			void *raw = RAWHDR(p, src, tcphdr, l3len);

			if (!raw)
				return UNREADABLE;
			ports = *(__u32 *)raw; /* source, dest */
			/* The header length matters only to a GSO packet's
			 * count: one guarded load fewer for every other. */
			if (g.size > 0)
				l4len = (*(__u8 *)(raw + 12) >> 4) * 4; /* doff */
		} else {
			void *raw = RAWHDR(p, src, udphdr, l3len);

			if (!raw)
				return UNREADABLE;
			ports = *(__u32 *)raw; /* source, dest */
			l4len = sizeof(struct udphdr);
		}
		sport = bpf_ntohs((__u16)ports);
		dport = bpf_ntohs((__u16)(ports >> 16));
		has_ports = 1;
		if (dport <= sport) {
			port = dport;
			flags |= FLOW_F_PORT_DST;
		} else {
			port = sport;
		}
	}
	if (gso_from == GSO_SHINFO) {
		/* Netfilter: the connection's DNAT (see flow_key). */
		op = orig_dst(skb, &key, ipv6, dport);
	} else if (has_ports) {
		/* cgroup_skb: a socket load balancer's rewrite, which only
		 * TCP and UDP sockets have (see sock_dsts). */
		op = sock_orig_dst(skb, &key, ipv6, dport);
	} else {
		((__u64 *)key.orig_daddr)[0] = 0;
		((__u64 *)key.orig_daddr)[1] = 0;
	}
	if (op >= 0) {
		flags |= FLOW_F_ORIG_DST;
		/* The tuple's port field is a port only where the key has
		 * ports (not ICMP's type and code, not a fragment's). */
		if (has_ports)
			orig_port = (__u64)op << 32;
	}
	/* The ports word in one store (port, proto, flags, orig_port, pad):
	 * a load that spans several narrower stores cannot be forwarded
	 * from the store buffer and waits for them to retire. */
	((__u64 *)&key)[4] = port | (__u32)proto << 16 | flags << 24 | orig_port;

	/* A GSO packet is one with a segment size (skb_is_gso()); the
	 * segment count is then set too, except by old drivers. */
	segs = 1;
	extra = 0;
	if (g.size > 0) {
		segs = g.segs;
		if (segs == 0 && len > l3len + l4len)
			segs = (len - l3len - l4len + g.size - 1) / g.size;
		if (segs <= 1)
			segs = 1;
		else
			extra = (__u64)(segs - 1) * (l3len + l4len);
	}
	/* One call site: account() is inlined once per parser copy. */
	account(&key, (__u64)len + extra, segs);
	return PARSED;
}

/* Headers copied for the slow path: enough for IPv6 with a few extension
 * headers and a TCP header. */
#define COPY_LEN 128

/*
 * count_copy is the slow path for packets whose headers are not in the
 * linear area: it copies the first bytes through a dynptr (which reads
 * paged data too) and parses the copy.
 */
static __always_inline int count_copy(struct sk_buff *skb, int ipv6, __u32 len,
				      void *gso_skb, const int gso_from)
{
	struct bpf_dynptr ptr;
	__u8 buf[COPY_LEN];
	__u32 n = len < COPY_LEN ? len : COPY_LEN;
	struct pkt p = { .base = buf, .avail = n };

	if (bpf_dynptr_from_skb((struct __sk_buff *)skb, 0, &ptr))
		return MALFORMED;
	if (n < 20 || bpf_dynptr_read(buf, n, &ptr, 0, 0))
		return MALFORMED;
	return parse_count(&p, SRC_CAST, ipv6, len, gso_skb, gso_from);
}

SEC("netfilter")
int kzn_netfilter(struct bpf_nf_ctx *ctx)
{
	struct sk_buff *skb = ctx->skb;
	int ipv6 = ctx->state->pf == NFPROTO_IPV6;
	__u32 len = skb->len, data_len = skb->data_len;
	struct pkt p = { .base = skb->data, .avail = len > data_len ? len - data_len : 0 };
	int r;

	r = parse_count(&p, SRC_CAST, ipv6, len, skb, GSO_SHINFO);
	if (r == UNREADABLE)
		r = count_copy(skb, ipv6, len, skb, GSO_SHINFO);
	if (r != PARSED)
		add_counter(COUNTER_PARSE_ERROR, len, packets_of(read_gso(skb, GSO_SHINFO)));
	return NF_ACCEPT;
}

SEC("cgroup_skb/egress")
int kzn_cgroup_egress(struct __sk_buff *skb)
{
	int ipv6 = skb->protocol == bpf_htons(ETH_P_IPV6);
	__u32 len = skb->len;
	struct pkt p = { .base = (void *)(long)skb->data, .end = (void *)(long)skb->data_end };
	int r;

	r = parse_count(&p, SRC_PKT, ipv6, len, skb, GSO_CTX);
	if (r == UNREADABLE)
		r = count_copy((struct sk_buff *)skb, ipv6, len, skb, GSO_CTX);
	if (r != PARSED)
		add_counter(COUNTER_PARSE_ERROR, len, packets_of(read_gso(skb, GSO_CTX)));
	return SK_PASS;
}

/*
 * record_dst stores the destination a socket asks for, before anything
 * rewrites it (see sock_dsts). It never refuses the connect() or sendmsg():
 * when the storage cannot be had the socket's flows have no original
 * destination, as in netfilter mode without conntrack.
 */
static __always_inline int record_dst(struct bpf_sock_addr *ctx, int ipv6)
{
	struct sock_dst *d = bpf_sk_storage_get(&sock_dsts, ctx->sk, 0,
						BPF_SK_STORAGE_GET_F_CREATE);

	if (!d)
		return 1;
	if (ipv6) {
		/* An IPv4-mapped address (a dual-stack socket reaching an
		 * IPv4 destination) is already in the key's form. */
		d->addr[0] = (__u64)ctx->user_ip6[1] << 32 | ctx->user_ip6[0];
		d->addr[1] = (__u64)ctx->user_ip6[3] << 32 | ctx->user_ip6[2];
	} else {
		d->addr[0] = 0;
		d->addr[1] = (__u64)ctx->user_ip4 << 32 | 0xffff0000;
	}
	d->port = bpf_ntohs((__u16)ctx->user_port);
	return 1;
}

SEC("cgroup/connect4")
int kzn_connect4(struct bpf_sock_addr *ctx)
{
	return record_dst(ctx, 0);
}

SEC("cgroup/connect6")
int kzn_connect6(struct bpf_sock_addr *ctx)
{
	return record_dst(ctx, 1);
}

/* Unconnected UDP: the destination of each datagram. The datagram leaves
 * through the egress hook within the same sendmsg() call, after this
 * program, so the record it finds is its own; two threads sending on one
 * socket at once may see each other's. The kernel runs these programs only
 * for a sendmsg() with an address: a connected UDP socket that also sends
 * to other addresses keeps the last of them as its record, and its
 * datagrams to the connected destination may report that one. */
SEC("cgroup/sendmsg4")
int kzn_sendmsg4(struct bpf_sock_addr *ctx)
{
	return record_dst(ctx, 0);
}

SEC("cgroup/sendmsg6")
int kzn_sendmsg6(struct bpf_sock_addr *ctx)
{
	return record_dst(ctx, 1);
}
