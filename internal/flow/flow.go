// Package flow is the flow model shared by the datapath, the agent and the
// server: who sent how much to whom, over which protocol and service port.
package flow

import (
	"fmt"
	"net/netip"
	"strconv"
)

// Key identifies a flow as the datapath counts it. The client's ephemeral
// port is deliberately not part of it (see Port), so the number of flows
// grows with pod pairs and services, not with connections.
type Key struct {
	// Src and Dst are the packet's source and destination addresses,
	// IPv4 addresses unmapped (never ::ffff:a.b.c.d).
	Src, Dst netip.Addr
	// Proto is the IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6).
	Proto uint8
	// Port is the service port: the lower of the two L4 ports, 0 when the
	// protocol has no ports or the packet was a fragment.
	Port uint16
	// PortIsDst says that Port is the destination port: the packets go
	// from client to service. Otherwise the service is the sender.
	PortIsDst bool
	// OrigDst is the destination the client addressed when it was
	// rewritten on the way: by destination NAT in netfilter mode (a
	// Service's virtual IP and port under kube-proxy, while Dst is the
	// backend pod it was sent to), by a socket load balancer's rewrite of
	// connect() or sendmsg() in cgroup mode (Cilium's kube-proxy
	// replacement). It is the zero AddrPort otherwise: for the backend's
	// replies, connections nothing rewrote, packets without a conntrack
	// entry in netfilter mode, and in cgroup mode for sockets whose
	// destination the agent did not record and for kube-proxy's DNAT,
	// which happens after the cgroup hook. It is what attributes traffic to a Service
	// rather than only to the pod that served it. The address is IPv4
	// unmapped, like Src and Dst; the port is 0 for protocols without
	// ports and for fragments, like Port.
	OrigDst netip.AddrPort
}

// Counts are the bytes and packets of a flow (or of a drop reason). Bytes
// are L3 bytes as on the wire: every IP packet with its own IP and L4
// headers, GSO super-packets counted as the segments they become.
type Counts struct {
	Bytes   uint64
	Packets uint64
}

// Add adds o to c.
func (c *Counts) Add(o Counts) {
	c.Bytes += o.Bytes
	c.Packets += o.Packets
}

// IsZero reports whether nothing was counted.
func (c Counts) IsZero() bool { return c.Bytes == 0 && c.Packets == 0 }

// Record is one flow with its counts over some interval.
type Record struct {
	Key
	Counts
}

// ProtoName returns the lowercase name of the common protocols and the
// decimal number of the others, the form used in labels and logs.
func ProtoName(p uint8) string {
	switch p {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 58:
		return "icmpv6"
	case 132:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}

// ParseProto is the inverse of ProtoName.
func ParseProto(s string) (uint8, error) {
	switch s {
	case "icmp":
		return 1, nil
	case "tcp":
		return 6, nil
	case "udp":
		return 17, nil
	case "icmpv6":
		return 58, nil
	case "sctp":
		return 132, nil
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil {
		return 0, fmt.Errorf("invalid protocol %q", s)
	}
	return uint8(n), nil
}
