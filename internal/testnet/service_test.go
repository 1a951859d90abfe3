package testnet

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// TestServiceDNAT: a connection from a pod to a Service's virtual
// address reaches the endpoint the rules name, which sees the client's own
// address (destination NAT only), over IPv4 and IPv6, TCP and UDP; after
// the endpoints change, new connections reach the new endpoint.
func TestServiceDNAT(t *testing.T) {
	testutil.RequireRoot(t)
	topo := BuildT(t, Spec{Nodes: []NodeSpec{{Name: "n0", Zone: "a", Pods: []string{"client"}}, {Name: "n1", Zone: "b", Pods: []string{"ep0", "ep1"}}}})
	client, ep0, ep1 := topo.Nodes[0].Pods[0], topo.Nodes[1].Pods[0], topo.Nodes[1].Pods[1]
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, tc := range []struct {
		name, proto string
		vip         netip.AddrPort
		eps         [2]netip.Addr
	}{
		{"tcp4", "tcp", netip.MustParseAddrPort("10.96.0.10:80"), [2]netip.Addr{ep0.IPv4, ep1.IPv4}},
		{"udp4", "udp", netip.MustParseAddrPort("10.96.0.10:53"), [2]netip.Addr{ep0.IPv4, ep1.IPv4}},
		{"tcp6", "tcp", netip.MustParseAddrPort("[fd00:96::10]:80"), [2]netip.Addr{ep0.IPv6, ep1.IPv6}},
		{"udp6", "udp", netip.MustParseAddrPort("[fd00:96::10]:53"), [2]netip.Addr{ep0.IPv6, ep1.IPv6}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for i, ep := range tc.eps {
				p := ServicePort{Name: tc.name, Proto: tc.proto, VIP: tc.vip, Endpoints: []netip.AddrPort{netip.AddrPortFrom(ep, 8080)}}
				if err := ServiceDNAT(ctx, topo.Nodes[0].NS, p); err != nil {
					t.Fatal(err)
				}
				ns := []string{ep0.NS, ep1.NS}[i]
				peer := exchange(t, ctx, tc.proto, client.NS, ns, tc.vip, netip.AddrPortFrom(ep, 8080))
				want := client.IPv4
				if tc.vip.Addr().Is6() {
					want = client.IPv6
				}
				if peer != want {
					t.Fatalf("endpoint %s saw the client as %s, want %s", ep, peer, want)
				}
			}
		})
	}
	if err := ServiceDNAT(ctx, topo.Nodes[0].NS, ServicePort{Name: "bad", Proto: "tcp", VIP: netip.MustParseAddrPort("10.96.0.11:80"),
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("[fd00::1]:80")}}); err == nil {
		t.Error("an IPv6 endpoint of an IPv4 address was accepted")
	}
}

// exchange listens on ep in namespace epNS, sends a message from clientNS
// to vip, and returns the address the endpoint saw the message from.
func exchange(t *testing.T, ctx context.Context, proto, clientNS, epNS string, vip, ep netip.AddrPort) netip.Addr {
	t.Helper()
	msg := []byte("hello")
	if proto == "udp" {
		pc, err := ListenPacket(epNS, "udp", ep.String())
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		c, err := Dial(ctx, clientNS, "udp", vip.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64)
		_ = pc.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, from, err := pc.ReadFrom(buf)
		if err != nil || string(buf[:n]) != string(msg) {
			t.Fatalf("endpoint %s read %q, %v", ep, buf[:n], err)
		}
		return from.(*net.UDPAddr).AddrPort().Addr().Unmap()
	}
	l, err := Listen(epNS, "tcp", ep.String())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := Dial(ctx, clientNS, "tcp", vip.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	buf, err := io.ReadAll(io.LimitReader(s, int64(len(msg))))
	if err != nil || string(buf) != string(msg) {
		t.Fatalf("endpoint %s read %q, %v", ep, buf, err)
	}
	return s.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
}
