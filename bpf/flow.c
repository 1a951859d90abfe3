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
 *     every socket's egress once, at the sender.
 *
 * Lossless drain: flows are counted in one of two per-CPU hash maps (two
 * generations). The outer array-of-maps `active` points at the generation in
 * use. User space swaps the inner map with a map-in-map update, which the
 * kernel only returns from after an RCU grace period (maybe_wait_bpf_programs
 * in kernel/bpf/syscall.c), so when the syscall returns no program can still
 * be writing to the idle generation, which is then drained at leisure.
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

/* Flags in flow_key.flags. */
enum flow_flag {
	/* Addresses are IPv6; otherwise IPv4-mapped (::ffff:a.b.c.d). */
	FLOW_F_IPV6 = 1,
	/* flow_key.port is the destination port (the packet goes to the
	 * service); otherwise it is the source port (the service answers). */
	FLOW_F_PORT_DST = 2,
	/* The packets are IP fragments: no L4 header, port is 0. */
	FLOW_F_FRAGMENT = 4,
};

/* One flow: who sent to whom, over which L4 protocol and service port. The
 * client's ephemeral port is left out on purpose so that a client opening
 * many connections to one service is one flow, not thousands. */
struct flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 port; /* host byte order */
	__u8 proto;
	__u8 flags;
};

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

/* One complete set of local prefixes. Two sets exist; user space fills the
 * idle one and then flips prefix_active, so a program never sees a set that
 * is half written. */
struct prefix_set {
	__u32 count;
	__u32 pad;
	struct prefix prefixes[MAX_LOCAL_PREFIXES];
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
	/* The generation map was missing (never expected). */
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

/* The generation programs write to; user space swaps entry 0. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct flow_map);
} active SEC(".maps");

/* The two prefix sets (pod CIDRs and node addresses of this node). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct prefix_set);
	__uint(max_entries, 2);
} prefix_sets SEC(".maps");

/* Index (0 or 1) of the prefix set in use. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} prefix_active SEC(".maps");

/* Cumulative per-CPU counters, indexed by enum counter. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct flow_stats);
	__uint(max_entries, COUNTER_MAX);
} counters SEC(".maps");

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

/* account adds one observation to the active generation, and never loses it
 * silently. */
static __always_inline void account(struct flow_key *key, __u64 bytes, __u64 packets)
{
	__u32 zero = 0;
	struct flow_stats *st;
	void *flows;
	long err;

	flows = bpf_map_lookup_elem(&active, &zero);
	if (!flows) {
		add_counter(COUNTER_NO_MAP, bytes, packets);
		return;
	}
	st = bpf_map_lookup_elem(flows, key);
	if (st) {
		__sync_fetch_and_add(&st->bytes, bytes);
		__sync_fetch_and_add(&st->packets, packets);
		return;
	}
	struct flow_stats init = { .bytes = bytes, .packets = packets };
	err = bpf_map_update_elem(flows, key, &init, BPF_NOEXIST);
	if (!err)
		return;
	if (err == -EEXIST) {
		/* Inserted concurrently (same CPU, nested): add to it. */
		st = bpf_map_lookup_elem(flows, key);
		if (st) {
			__sync_fetch_and_add(&st->bytes, bytes);
			__sync_fetch_and_add(&st->packets, packets);
			return;
		}
	}
	add_counter(err == -E2BIG ? COUNTER_MAP_FULL : COUNTER_MAP_ERROR, bytes, packets);
}

struct iphdr4 {
	__u8 ver_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
};

struct iphdr6 {
	__be32 ver_tc_flow;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* The first 14 bytes of a TCP header are enough for ports and data offset;
 * UDP uses the first 4. */
struct l4hdr {
	__be16 sport;
	__be16 dport;
	__u8 rest[8];
	__u8 doff_res; /* TCP: data offset in the high nibble */
	__u8 flags;
};

/* The headers of the common packet, fetched with one slice. */
struct hdr4 {
	struct iphdr4 ip;
	struct l4hdr l4;
};

struct hdr6 {
	struct iphdr6 ip;
	struct l4hdr l4;
};

struct ext6 {
	__u8 nexthdr;
	__u8 hdrlen;
	__be16 frag_off; /* only meaningful in a fragment header */
	__u8 rest[4];
};

/* is_local reports whether the source belongs to this node. */
static __always_inline int is_local(const struct flow_key *key)
{
	const __u64 *a = (const __u64 *)key->saddr;
	struct prefix_set *set;
	__u32 zero = 0, *idx;

	idx = bpf_map_lookup_elem(&prefix_active, &zero);
	if (!idx)
		return 0;
	set = bpf_map_lookup_elem(&prefix_sets, idx);
	if (!set)
		return 0;
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

/*
 * count parses the L3 packet behind ptr (data starts at the IP header) and
 * accounts for it. len is the skb length, gso_segs and gso_size the GSO
 * metadata (0 when not a GSO packet).
 */
static __always_inline void count(struct bpf_dynptr *ptr, int ipv6, __u32 len,
				  __u32 gso_segs, __u32 gso_size)
{
	struct flow_key key = {};
	__u32 l3len, l4len = 0, segs;
	__u8 proto, buf[sizeof(struct hdr6)];
	struct l4hdr *l4 = NULL;
	int has_l4 = 1;

	if (!ipv6) {
		/* One slice for the IP and L4 headers of the common packet
		 * (no IP options, at least 34 bytes); two otherwise. */
		struct hdr4 *h = bpf_dynptr_slice(ptr, 0, buf, sizeof(*h));
		struct iphdr4 *ip = h ? &h->ip : bpf_dynptr_slice(ptr, 0, buf, sizeof(*ip));
		__u32 *s, *d;

		if (!ip || (ip->ver_ihl >> 4) != 4)
			goto parse_error;
		if (h && ip->ver_ihl == 0x45)
			l4 = &h->l4;
		l3len = (ip->ver_ihl & 0xf) * 4;
		if (l3len < sizeof(*ip))
			goto parse_error;
		proto = ip->protocol;
		s = (__u32 *)key.saddr;
		d = (__u32 *)key.daddr;
		s[2] = bpf_htonl(0xffff);
		s[3] = ip->saddr;
		d[2] = bpf_htonl(0xffff);
		d[3] = ip->daddr;
		if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) {
			key.flags |= FLOW_F_FRAGMENT;
			has_l4 = 0;
		}
	} else {
		struct hdr6 *h = bpf_dynptr_slice(ptr, 0, buf, sizeof(*h));
		struct iphdr6 *ip6 = h ? &h->ip : bpf_dynptr_slice(ptr, 0, buf, sizeof(*ip6));

		if (!ip6 || (bpf_ntohl(ip6->ver_tc_flow) >> 28) != 6)
			goto parse_error;
		key.flags |= FLOW_F_IPV6;
		__builtin_memcpy(key.saddr, ip6->saddr, 16);
		__builtin_memcpy(key.daddr, ip6->daddr, 16);
		proto = ip6->nexthdr;
		l3len = sizeof(*ip6);
		if (h)
			l4 = &h->l4; /* only used if no extension header follows */
		/* Walk a bounded number of extension headers. */
#pragma unroll
		for (int i = 0; i < 4; i++) {
			struct ext6 *ext;

			if (proto != IPPROTO_HOPOPTS && proto != IPPROTO_ROUTING &&
			    proto != IPPROTO_DSTOPTS && proto != IPPROTO_FRAGMENT &&
			    proto != IPPROTO_AH)
				break;
			l4 = NULL; /* the L4 header is further on */
			ext = bpf_dynptr_slice(ptr, l3len, buf, sizeof(*ext));
			if (!ext)
				goto parse_error;
			if (proto == IPPROTO_FRAGMENT) {
				key.flags |= FLOW_F_FRAGMENT;
				has_l4 = 0;
				l3len += 8;
			} else if (proto == IPPROTO_AH) {
				l3len += ((__u32)ext->hdrlen + 2) * 4;
			} else {
				l3len += ((__u32)ext->hdrlen + 1) * 8;
			}
			proto = ext->nexthdr;
		}
	}
	key.proto = proto;

	if (!is_local(&key)) {
		add_counter(COUNTER_NOT_LOCAL, len, gso_segs > 1 ? gso_segs : 1);
		return;
	}

	if (has_l4 && (proto == IPPROTO_TCP || proto == IPPROTO_UDP)) {
		__u16 sport, dport;

		if (!l4)
			l4 = bpf_dynptr_slice(ptr, l3len, buf, sizeof(*l4));
		if (!l4)
			goto parse_error;
		sport = bpf_ntohs(l4->sport);
		dport = bpf_ntohs(l4->dport);
		if (dport <= sport) {
			key.port = dport;
			key.flags |= FLOW_F_PORT_DST;
		} else {
			key.port = sport;
		}
		l4len = proto == IPPROTO_TCP ? (__u32)(l4->doff_res >> 4) * 4 : 8;
	}

	segs = gso_segs;
	if (segs == 0 && gso_size > 0 && len > l3len + l4len)
		segs = (len - l3len - l4len + gso_size - 1) / gso_size;
	if (segs <= 1) {
		account(&key, len, 1);
		return;
	}
	account(&key, (__u64)len + (__u64)(segs - 1) * (l3len + l4len), segs);
	return;

parse_error:
	add_counter(COUNTER_PARSE_ERROR, len, gso_segs > 1 ? gso_segs : 1);
}

SEC("netfilter")
int kzn_netfilter(struct bpf_nf_ctx *ctx)
{
	struct sk_buff *skb = ctx->skb;
	struct skb_shared_info *shinfo;
	struct bpf_dynptr ptr;
	__u32 len = skb->len;

	if (bpf_dynptr_from_skb(skb, 0, &ptr)) {
		add_counter(COUNTER_PARSE_ERROR, len, 1);
		return NF_ACCEPT;
	}
	/* skb_shinfo(skb): head + end (an offset on 64-bit kernels). */
	shinfo = bpf_rdonly_cast(skb->head + skb->end,
				 bpf_core_type_id_kernel(struct skb_shared_info));
	count(&ptr, ctx->state->pf == NFPROTO_IPV6, len, shinfo->gso_segs, shinfo->gso_size);
	return NF_ACCEPT;
}

SEC("cgroup_skb/egress")
int kzn_cgroup_egress(struct __sk_buff *skb)
{
	struct bpf_dynptr ptr;

	if (bpf_dynptr_from_skb((struct sk_buff *)skb, 0, &ptr)) {
		add_counter(COUNTER_PARSE_ERROR, skb->len, 1);
		return SK_PASS;
	}
	count(&ptr, skb->protocol == bpf_htons(ETH_P_IPV6), skb->len, skb->gso_segs, skb->gso_size);
	return SK_PASS;
}
