// Package reference holds a yardstick for the datapath's benchmarks: a
// netfilter program shaped like the original kubezonnet agent's, whose
// figures the datapath issue quotes from its reference machine. Only
// tests load it; nothing in kubezonnet imports it.
package reference

//go:generate go tool bpf2go -cc clang -cflags "-O2 -mcpu=v3 -g -Wall -Werror -I/usr/include/$ARCH_TRIPLET" -tags linux -target bpfel reference reference.c -- -I../headers
