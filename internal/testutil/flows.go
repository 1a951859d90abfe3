package testutil

import (
	"net/netip"

	"github.com/kubezonnet/kubezonnet/internal/flow"
)

// ClusterFlows makes n flows shaped like a node's real traffic: 100 local
// pods talking to 2,000 remote pods on a few service ports, with counts
// that vary, a quarter of them IPv6. Benchmarks of the agent's flush and
// of the wire encoding measure the same flows with it.
func ClusterFlows(n int) []flow.Record {
	out := make([]flow.Record, 0, n)
	ports := []uint16{80, 443, 5432, 6379, 8080, 9090, 53}
	for i := range n {
		src := netip.AddrFrom4([4]byte{10, 244, 1, byte(2 + i%100)})
		dst := netip.AddrFrom4([4]byte{10, 244, byte(2 + (i/100)%20), byte(2 + (i/2000)%250)})
		if i%4 == 3 {
			src = netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x10, 0x2, 0x44, 0, 1, 15: byte(2 + i%100)})
			dst = netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x10, 0x2, 0x44, 0, byte(2 + (i/100)%20), 14: byte(i / 2000), 15: byte(2 + (i/2000)%250)})
		}
		out = append(out, flow.Record{
			Key:    flow.Key{Src: src, Dst: dst, Proto: 6, Port: ports[i%len(ports)], PortIsDst: i%3 != 0},
			Counts: flow.Counts{Bytes: uint64(1000 + i*37%900_000), Packets: uint64(1 + i*7%700)},
		})
	}
	return out
}
