// Package nfhook holds the one copy of the part of the kernel's struct
// nf_hook_state that BPF_PROG_TEST_RUN accepts from user space, for the
// tests and benchmarks that run netfilter programs without a network (the
// datapath's, package bpf, and the reference program's, package
// bpf/reference). The agent never runs a program this way.
package nfhook

// Values of struct nf_hook_state's fields, from the kernel's UAPI
// (include/uapi/linux/netfilter.h).
const (
	// InetLocalOut is NF_INET_LOCAL_OUT in enum nf_inet_hooks. The test
	// run builds an skb without a link-layer header only for this hook
	// (bpf_prog_test_run_nf in net/bpf/test_run.c), and the programs do
	// not look at the hook, so tests run them there.
	InetLocalOut = 3
	// ProtoIPv4 is NFPROTO_IPV4.
	ProtoIPv4 = 2
	// ProtoIPv6 is NFPROTO_IPV6.
	ProtoIPv6 = 10
)

// State is the head of the kernel's struct nf_hook_state: the hook and the
// protocol family, the only fields BPF_PROG_TEST_RUN takes from user space
// (the rest must be zero, so they are left out). Pass it as
// ebpf.RunOptions.Context.
type State struct {
	// Hook is the netfilter hook (enum nf_inet_hooks).
	Hook uint8
	// PF is the protocol family (NFPROTO_*).
	PF uint8
}

// ForPacket returns the LOCAL_OUT hook state for the L3 packet pkt, with the
// family read from its IP version: the programs tell IPv4 from IPv6 by the
// family, not by the packet.
func ForPacket(pkt []byte) State {
	s := State{Hook: InetLocalOut, PF: ProtoIPv4}
	if len(pkt) > 0 && pkt[0]>>4 == 6 {
		s.PF = ProtoIPv6
	}
	return s
}
