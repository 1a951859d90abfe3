/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * The few kernel-internal types the datapath reads, declared by hand with
 * preserve_access_index so that clang emits CO-RE relocations: only the named
 * fields matter, their offsets are fixed up by the loader against the
 * running kernel's BTF. Keeping this file tiny (instead of a 3 MB vmlinux.h)
 * keeps diffs readable and makes it obvious which kernel fields we depend on.
 */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* struct nf_hook_state: pf is the protocol family of the hook (NFPROTO_IPV4
 * = 2, NFPROTO_IPV6 = 10). */
struct nf_hook_state {
	__u8 hook;
	__u8 pf;
} __attribute__((preserve_access_index));

/* struct sk_buff from include/linux/skbuff.h: len is the L3 length at the
 * POSTROUTING hook; head + end locate struct skb_shared_info. On 64-bit
 * kernels end is an offset from head (NET_SKBUFF_DATA_USES_OFFSET). */
struct sk_buff {
	unsigned int len;
	unsigned char *head;
	unsigned int end;
} __attribute__((preserve_access_index));

/* struct skb_shared_info: GSO metadata of a super-packet. */
struct skb_shared_info {
	unsigned short gso_size;
	unsigned short gso_segs;
} __attribute__((preserve_access_index));

/* struct bpf_nf_ctx from include/net/netfilter/nf_bpf_link.h: the context
 * of BPF_PROG_TYPE_NETFILTER programs. */
struct bpf_nf_ctx {
	const struct nf_hook_state *state;
	struct sk_buff *skb;
} __attribute__((preserve_access_index));

/* kfuncs (kernel 6.4+ for netfilter programs). */
extern int bpf_dynptr_from_skb(struct sk_buff *skb, __u64 flags,
			       struct bpf_dynptr *ptr__uninit) __ksym;
extern void *bpf_dynptr_slice(const struct bpf_dynptr *ptr, __u32 offset,
			      void *buffer__opt, __u32 buffer__szk) __ksym;
/* Turns a kernel address into a read-only typed pointer whose loads the
 * verifier turns into fault-tolerant direct loads: much cheaper than a
 * bpf_probe_read_kernel() helper call per field. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;
