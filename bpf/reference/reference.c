// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
//go:build ignore

/*
 * A yardstick, not part of kubezonnet: a netfilter program built the way
 * the original kubezonnet agent counted (github.com/polarsignals/kubezonnet,
 * agent/kubezonnet.c), rewritten here after reading it (nothing copied) so
 * that the original's per-packet cost can be measured on the machine at
 * hand. It takes the IPv4 header through bpf_dynptr_from_skb() and
 * bpf_dynptr_slice(), checks both addresses against one subnet, and adds
 * the header's tot_len to a hash map keyed by (source, destination): a
 * lookup and an atomic add for a known pair, an update for a new one. No
 * IPv6, no packet counts, no GSO, no drain protocol, a 1,024-entry map.
 *
 * Run next to kubezonnet's program and an empty one
 * (BenchmarkNetfilterReference), it shows what the original's shape costs
 * on this host, in the same host state: the ratio depends on the CPU and
 * its mitigations (BENCHMARKS.md).
 */

#include "../headers/kernel.h"
#include <bpf/bpf_endian.h>

char __license[] SEC("license") = "Dual MIT/GPL";

#define NF_ACCEPT 1
#define NFPROTO_IPV4 2

extern void *bpf_dynptr_slice(const struct bpf_dynptr *ptr, __u32 offset, void *buffer,
			      __u32 buffer__szk) __ksym;

struct pair {
	__u32 saddr;
	__u32 daddr;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct pair);
	__type(value, __u64);
	__uint(max_entries, 1024);
} pairs SEC(".maps");

/* The pod subnet, network byte order; set at load. */
volatile const __u32 subnet = 0;
volatile const __u32 subnet_mask = 0;

SEC("netfilter")
int reference_netfilter(struct bpf_nf_ctx *ctx)
{
	struct bpf_dynptr ptr;
	__u8 buf[sizeof(struct iphdr)] = {};
	struct iphdr *ip;
	__u64 *bytes;

	if (ctx->state->pf != NFPROTO_IPV4)
		return NF_ACCEPT;
	if (bpf_dynptr_from_skb((struct __sk_buff *)ctx->skb, 0, &ptr))
		return NF_ACCEPT;
	ip = bpf_dynptr_slice(&ptr, 0, buf, sizeof(buf));
	if (!ip)
		return NF_ACCEPT;
	if ((ip->saddr & subnet_mask) != subnet || (ip->daddr & subnet_mask) != subnet)
		return NF_ACCEPT;

	struct pair key = { .saddr = ip->saddr, .daddr = ip->daddr };
	__u64 len = bpf_ntohs(ip->tot_len);

	bytes = bpf_map_lookup_elem(&pairs, &key);
	if (bytes)
		__sync_fetch_and_add(bytes, len);
	else
		bpf_map_update_elem(&pairs, &key, &len, BPF_ANY);
	return NF_ACCEPT;
}
