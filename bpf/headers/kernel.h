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

/* struct sk_buff from include/linux/skbuff.h: at the POSTROUTING hook data
 * points at the IP header and len is the L3 length; len - data_len bytes
 * from data are linear; head + end locate struct skb_shared_info (end is an
 * offset from head on 64-bit kernels, NET_SKBUFF_DATA_USES_OFFSET). _nfct
 * is the packet's conntrack entry (struct nf_conn *) with enum
 * ip_conntrack_info in its low 3 bits; the field exists only in kernels
 * built with conntrack (checked with bpf_core_field_exists()). */
struct sk_buff {
	unsigned int len;
	unsigned int data_len;
	unsigned char *head;
	unsigned char *data;
	unsigned int end;
	unsigned long _nfct;
} __attribute__((preserve_access_index));

/* Conntrack, from include/net/netfilter/nf_conntrack.h and
 * nf_conntrack_tuple.h: only the fields the netfilter program reads, the
 * status bits and the original direction's destination. They are located
 * with bpf_core_field_offset() and read through a bpf_rdonly_cast() to
 * struct in6_addr (a vmlinux type in every kernel), not to struct nf_conn,
 * whose type is in a module's BTF where conntrack is a module. */
union nf_inet_addr {
	__u32 all[4];
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple {
	struct {
		union nf_inet_addr u3;
		union {
			__be16 all;
		} u;
	} dst;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple_hash {
	struct nf_conntrack_tuple tuple;
} __attribute__((preserve_access_index));

struct nf_conn {
	struct nf_conntrack_tuple_hash tuplehash[2]; /* IP_CT_DIR_MAX */
	unsigned long status;
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

/* Protocol headers as the kernel declares them (their layout is the wire
 * format). The netfilter program reads them through bpf_rdonly_cast(),
 * which needs the kernel's BTF type of the same name; the cgroup program
 * reads the same types through direct packet access. */
struct iphdr {
	__u8 ihl : 4, version : 4;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
} __attribute__((preserve_access_index));

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__be16 u6_addr16[8];
		__be32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

struct ipv6hdr {
	__u8 priority : 4, version : 4;
	__u8 flow_lbl[3];
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	struct in6_addr saddr;
	struct in6_addr daddr;
} __attribute__((preserve_access_index));

struct ipv6_opt_hdr {
	__u8 nexthdr;
	__u8 hdrlen;
} __attribute__((preserve_access_index));

struct frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
} __attribute__((preserve_access_index));

struct tcphdr {
	__be16 source;
	__be16 dest;
	__be32 seq;
	__be32 ack_seq;
	__u16 res1 : 4, doff : 4, fin : 1, syn : 1, rst : 1, psh : 1, ack : 1, urg : 1, ece : 1, cwr : 1;
	__be16 window;
	__sum16 check;
	__be16 urg_ptr;
} __attribute__((preserve_access_index));

struct udphdr {
	__be16 source;
	__be16 dest;
	__be16 len;
	__sum16 check;
} __attribute__((preserve_access_index));

/* kfuncs (kernel 6.4+ for netfilter programs). The kernel declares the
 * skb as the context type, struct __sk_buff, though it takes a struct
 * sk_buff; the loader checks the declaration against the kernel's. */
extern int bpf_dynptr_from_skb(struct __sk_buff *skb, __u64 flags,
			       struct bpf_dynptr *ptr__uninit) __ksym;
/* Turns a kernel address into a read-only typed pointer whose loads the
 * verifier turns into fault-tolerant direct loads: much cheaper than a
 * bpf_probe_read_kernel() helper call per field. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;
