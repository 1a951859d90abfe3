//go:build linux

package bpf

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// inCgroup runs fn with this process moved into cgroup dir, then moves it
// back. Sockets remember the cgroup they were created in, so a socket made
// in fn is seen by programs attached to dir for its whole life.
func inCgroup(t *testing.T, root, dir string, fn func()) {
	t.Helper()
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	orig := root
	for _, line := range strings.Split(string(self), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			orig = filepath.Join(root, rest)
		}
	}
	pid := []byte(fmt.Sprint(os.Getpid()))
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), pid, 0); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := os.WriteFile(filepath.Join(orig, "cgroup.procs"), pid, 0); err != nil {
			t.Errorf("moving back to %s: %v", orig, err)
		}
	}()
	fn()
}

// TestCgroupEgressMatchesNftables attaches the cgroup_skb program to a
// cgroup made for the test, opens the client sockets of a pod from inside
// it, and compares the counts with an nftables counter on the pod's own
// egress: TCP over IPv4 and UDP over IPv6, through the same counting
// routine as the netfilter program.
func TestCgroupEgressMatchesNftables(t *testing.T) {
	root, dir := testCgroup(t)

	topo := twoNodes(t, false)
	a1, b1 := topo.Pod("a1"), topo.Pod("b1")
	d := loadLocal(t, Config{}, a1.Node.PodCIDRs[0].String(), a1.Node.PodCIDRs[1].String())
	if err := d.AttachCgroup(dir); err != nil {
		t.Fatal(err)
	}
	// Only socket traffic: packets the kernel sends on its own (ICMPv6
	// neighbour discovery) belong to no socket and so to no cgroup; the
	// cgroup hook cannot see them, by design (netfilter mode does).
	ref, err := testnet.InstallCounterMatch(context.Background(), a1.NS, 0, []netip.Prefix{
		netip.PrefixFrom(a1.IPv4, 32), netip.PrefixFrom(a1.IPv6, 128),
	}, "meta l4proto { tcp, udp }")
	if err != nil {
		t.Fatal(err)
	}

	tcpDst := netip.AddrPortFrom(b1.IPv4, 5432)
	l, err := testnet.Listen(b1.NS, "tcp4", tcpDst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	udpDst := netip.AddrPortFrom(b1.IPv6, 53)
	rx, err := testnet.ListenPacket(b1.NS, "udp6", udpDst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()

	var tcp, udp net.Conn
	inCgroup(t, root, dir, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if tcp, err = testnet.Dial(ctx, a1.NS, "tcp4", tcpDst.String()); err != nil {
			t.Fatal(err)
		}
		if udp, err = testnet.Dial(ctx, a1.NS, "udp6", udpDst.String()); err != nil {
			t.Fatal(err)
		}
	})
	got := make(chan int64, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- -1
			return
		}
		n, _ := io.Copy(io.Discard, c)
		c.Close()
		got <- n
	}()
	const payload = 3 << 20
	if _, err := tcp.Write(make([]byte, payload)); err != nil {
		t.Fatal(err)
	}
	tcp.(*net.TCPConn).CloseWrite()
	if n := <-got; n != payload {
		t.Fatalf("receiver got %d bytes", n)
	}
	tcp.SetReadDeadline(time.Now().Add(10 * time.Second))
	io.Copy(io.Discard, tcp)
	tcp.Close()
	// The client's last ACK (of the receiver's FIN) has passed the pod's
	// egress once the receiver leaves LAST-ACK.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := testnet.WaitNoLastACK(ctx, b1.NS); err != nil {
		t.Fatal(err)
	}
	for range 25 {
		if _, err := udp.Write(make([]byte, 900)); err != nil {
			t.Fatal(err)
		}
	}
	udp.Close()
	// A datagram read in b1 has gone through a1's egress: read all 25
	// (they fit the socket's buffer, nothing reads rx before this).
	rx.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 2048)
	for i := range 25 {
		n, _, err := rx.ReadFrom(buf)
		if err != nil {
			t.Fatalf("datagram %d of 25: %v", i+1, err)
		}
		if n != 900 {
			t.Fatalf("datagram %d of 25 has %d bytes, want 900", i+1, n)
		}
	}

	want, err := ref.Read(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	dr := drain(t, d)
	gotC := total(dr.Flows)
	if gotC.Bytes != want.Bytes || gotC.Packets != want.Packets {
		t.Errorf("cgroup program counted %+v, nftables on the pod's egress %+v", gotC, want)
	}
	if c, ok := find(dr.Flows, a1.IPv6, b1.IPv6, 17); !ok || c.Packets != 25 || c.Bytes != 25*(900+48) {
		t.Errorf("udp6 flow = %+v, want 25 packets of 948 bytes", c)
	}
	if c, ok := find(dr.Flows, a1.IPv4, b1.IPv4, 6); !ok || c.Bytes < payload {
		t.Errorf("tcp flow = %+v, want at least the %d payload bytes", c, payload)
	}
	t.Logf("cgroup egress: %d flows, %+v (nftables %+v)", len(dr.Flows), gotC, want)
}

// TestCgroupEgressKeepsServiceAddress: the cgroup_skb program runs at the
// sending socket, before the node's netfilter hooks where kube-proxy's
// DNAT happens, so a datagram to a Service is counted to the virtual IP
// itself, with no original destination (the backend is not known there,
// and the destination the socket connected to is the packet's).
func TestCgroupEgressKeepsServiceAddress(t *testing.T) {
	root, dir := testCgroup(t)

	topo := twoNodes(t, false)
	a, a1, a2, b1 := topo.Node("a"), topo.Pod("a1"), topo.Pod("a2"), topo.Pod("b1")
	if _, err := testnet.Exec(context.Background(), a.NS, "sh", "-c", "nft -f - <<'EOF'\n"+serviceRules(a2, b1)+"EOF\n"); err != nil {
		t.Fatalf("installing the service rules: %v", err)
	}
	d := loadLocal(t, Config{}, a1.Node.PodCIDRs[0].String(), a1.Node.PodCIDRs[1].String())
	if err := d.AttachCgroup(dir); err != nil {
		t.Fatal(err)
	}
	vip, backend := netip.AddrPortFrom(vip4, 53), netip.AddrPortFrom(b1.IPv4, 5353)
	rx, err := testnet.ListenPacket(b1.NS, "udp4", backend.String())
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	var c net.Conn
	inCgroup(t, root, dir, func() {
		if c, err = testnet.Dial(context.Background(), a1.NS, "udp4", vip.String()); err != nil {
			t.Fatal(err)
		}
	})
	defer c.Close()
	const count, size = 10, 500
	for range count {
		if _, err := c.Write(make([]byte, size)); err != nil {
			t.Fatal(err)
		}
	}
	// A datagram read at the backend has gone through a1's egress.
	rx.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 2048)
	for i := range count {
		if _, _, err := rx.ReadFrom(buf); err != nil {
			t.Fatalf("datagram %d of %d at the backend: %v", i+1, count, err)
		}
	}
	want := flow.Record{
		Key:    flow.Key{Src: a1.IPv4, Dst: vip4, Proto: 17, Port: 53, PortIsDst: true},
		Counts: flow.Counts{Bytes: count * (size + 28), Packets: count},
	}
	if dr := drain(t, d); len(dr.Flows) != 1 || dr.Flows[0] != want {
		t.Errorf("flows %+v, want %+v", dr.Flows, want)
	}
}

// testCgroup returns the cgroup v2 hierarchy's root and a directory made
// for the test under it, removed at cleanup (the test's processes have left
// it by then). It skips the test when not root.
func testCgroup(t *testing.T) (root, dir string) {
	t.Helper()
	testutil.RequireRoot(t)
	root, err := CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	if dir, err = os.MkdirTemp(root, "kzn-test-"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(dir) })
	return root, dir
}
