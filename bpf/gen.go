// Package bpf holds kubezonnet's eBPF datapath: the C program in flow.c, the
// bpf2go output compiled from it (committed, so that building the Go code
// needs no clang), and the Go API the agent uses to load it, attach it,
// tell it which sources are local, drain its counts and close it.
package bpf

// Only little-endian BPF is generated: every architecture we ship (amd64,
// arm64) is little-endian, and one object keeps the repository small.
// -mcpu=v3 for BPF_FETCH atomics (the drain protocol in flow.c needs their
// full ordering; kernels since 5.12 have them, netfilter programs need 6.4).
// -type emits the structs shared with C so that no layout is written twice.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -mcpu=v3 -g -Wall -Werror -I/usr/include/$ARCH_TRIPLET" -tags linux -target bpfel -type flow_key -type flow_stats -type prefix_set -type table_slot -type counter -type flow_flag flow flow.c -- -I./headers
