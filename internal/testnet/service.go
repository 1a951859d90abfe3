package testnet

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"
)

// kubeProxyTable is the nftables table ServiceDNAT writes in a node
// namespace, shaped like kube-proxy's nftables mode: verdict maps from a
// Service's virtual address, protocol and port to the Service's chain, one
// chain per Service port choosing an endpoint at random per connection,
// and one chain per endpoint doing the rewrite.
const kubeProxyTable = "kzn-kube-proxy"

// ServicePort is one port of a Service as kube-proxy programs it: its
// virtual address and port, its protocol, and the endpoints it may be
// rewritten to (ready endpoints only, as kube-proxy does).
type ServicePort struct {
	// Name names the port's chains; unique per node namespace.
	Name string
	// Proto is "tcp" or "udp".
	Proto     string
	VIP       netip.AddrPort
	Endpoints []netip.AddrPort
}

// ServiceDNAT programs p in node namespace ns: connections to p.VIP from
// the node's pods (prerouting) and from the node itself (output) are
// destination-NATed to one of p.Endpoints by the kernel's conntrack, as on
// a node running kube-proxy. Calling it again for the same port replaces
// its endpoints (an endpoint turning not-ready); without endpoints, new
// connections are refused, as kube-proxy refuses them. Existing
// connections keep their endpoint: conntrack remembers the rewrite.
func ServiceDNAT(ctx context.Context, ns string, p ServicePort) error {
	if p.Proto != "tcp" && p.Proto != "udp" {
		return fmt.Errorf("service port %s: protocol %q, want tcp or udp", p.Name, p.Proto)
	}
	family, typ := "ip", "ipv4_addr"
	if p.VIP.Addr().Is6() {
		family, typ = "ip6", "ipv6_addr"
	}
	for _, ep := range p.Endpoints {
		if ep.Addr().Is6() != p.VIP.Addr().Is6() {
			return fmt.Errorf("service port %s: endpoint %s is not of the virtual address's family (%s)", p.Name, ep, p.VIP)
		}
	}
	var b strings.Builder
	t := "inet " + kubeProxyTable
	fmt.Fprintf(&b, "add table %s\n", t)
	for _, m := range []struct{ name, typ string }{{"services4", "ipv4_addr"}, {"services6", "ipv6_addr"}} {
		fmt.Fprintf(&b, "add map %s %s { type %s . inet_proto . inet_service : verdict ; }\n", t, m.name, m.typ)
	}
	for _, c := range []struct{ name, hook string }{{"nat-prerouting", "prerouting"}, {"nat-output", "output"}} {
		fmt.Fprintf(&b, "add chain %s %s { type nat hook %s priority -100 ; policy accept ; }\n", t, c.name, c.hook)
		fmt.Fprintf(&b, "flush chain %s %s\n", t, c.name)
		fmt.Fprintf(&b, "add rule %s %s ip daddr . meta l4proto . th dport vmap @services4\n", t, c.name)
		fmt.Fprintf(&b, "add rule %s %s ip6 daddr . meta l4proto . th dport vmap @services6\n", t, c.name)
	}
	svc := "svc-" + p.Name
	fmt.Fprintf(&b, "add chain %s %s\nflush chain %s %s\n", t, svc, t, svc)
	if len(p.Endpoints) == 0 {
		fmt.Fprintf(&b, "add rule %s %s reject\n", t, svc)
	} else {
		var choices []string
		for i, ep := range p.Endpoints {
			chain := fmt.Sprintf("ep-%s-%d", p.Name, i)
			fmt.Fprintf(&b, "add chain %s %s\nflush chain %s %s\n", t, chain, t, chain)
			fmt.Fprintf(&b, "add rule %s %s meta l4proto %s dnat %s to %s\n", t, chain, p.Proto, family, ep)
			choices = append(choices, fmt.Sprintf("%d : goto %s", i, chain))
		}
		fmt.Fprintf(&b, "add rule %s %s numgen random mod %d vmap { %s }\n", t, svc, len(p.Endpoints), strings.Join(choices, ", "))
	}
	m := "services4"
	if typ == "ipv6_addr" {
		m = "services6"
	}
	fmt.Fprintf(&b, "add element %s %s { %s . %s . %d : goto %s }\n", t, m, p.VIP.Addr(), p.Proto, p.VIP.Port(), svc)
	if _, err := Exec(ctx, ns, "sh", "-c", "nft -f - <<'EOF'\n"+b.String()+"EOF\n"); err != nil {
		return fmt.Errorf("programming service port %s (%s %s) in %s: %w", p.Name, p.Proto, p.VIP, ns, err)
	}
	return nil
}

// TransferToService sends n bytes over one connection (TCP or UDP: proto "tcp"
// or "udp") from namespace fromNS to a Service's virtual address vip,
// with a listener on every endpoint (endpoints maps each endpoint to its
// namespace), and returns the endpoint the node's rules chose. Over TCP
// it returns once both sides have closed; over UDP the n bytes go in
// datagrams of at most 1000 bytes, and it returns once the endpoint has
// read them all.
func TransferToService(ctx context.Context, proto, fromNS string, vip netip.AddrPort, endpoints map[netip.AddrPort]string, n int) (netip.AddrPort, error) {
	family := "4"
	if vip.Addr().Is6() {
		family = "6"
	}
	type arrival struct {
		ep  netip.AddrPort
		err error
	}
	got := make(chan arrival, len(endpoints))
	var closers []func() error
	defer func() {
		for _, c := range closers {
			c()
		}
	}()
	for ep, ns := range endpoints {
		switch proto {
		case "tcp":
			l, err := Listen(ns, "tcp"+family, ep.String())
			if err != nil {
				return netip.AddrPort{}, err
			}
			closers = append(closers, l.Close)
			go func() {
				c, err := l.Accept()
				if err != nil {
					return // closed: another endpoint was chosen
				}
				k, err := io.Copy(io.Discard, c)
				c.Close()
				if err == nil && k != int64(n) {
					err = fmt.Errorf("endpoint %s got %d bytes, want %d", ep, k, n)
				}
				got <- arrival{ep, err}
			}()
		case "udp":
			pc, err := ListenPacket(ns, "udp"+family, ep.String())
			if err != nil {
				return netip.AddrPort{}, err
			}
			closers = append(closers, pc.Close)
			go func() {
				buf := make([]byte, 2048)
				for k := 0; k < n; {
					m, _, err := pc.ReadFrom(buf)
					if err != nil {
						if k > 0 {
							got <- arrival{ep, fmt.Errorf("endpoint %s got %d bytes, want %d: %w", ep, k, n, err)}
						}
						return
					}
					k += m
				}
				got <- arrival{ep, nil}
			}()
		default:
			return netip.AddrPort{}, fmt.Errorf("transfer via %s: protocol %q, want tcp or udp", vip, proto)
		}
	}
	c, err := Dial(ctx, fromNS, proto+family, vip.String())
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer c.Close()
	chunk := n
	if proto == "udp" {
		chunk = 1000
	}
	buf := make([]byte, min(n, chunk))
	for left := n; left > 0; {
		k, err := c.Write(buf[:min(left, len(buf))])
		if err != nil {
			return netip.AddrPort{}, err
		}
		left -= k
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
	var a arrival
	select {
	case a = <-got:
	case <-ctx.Done():
		return netip.AddrPort{}, fmt.Errorf("transfer via %s: no endpoint received it: %w", vip, ctx.Err())
	}
	if a.err != nil {
		return netip.AddrPort{}, a.err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, _ = io.Copy(io.Discard, tc)
	}
	return a.ep, nil
}
