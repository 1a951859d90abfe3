//go:build linux

package agent

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/netns"
)

// injector puts hand-built L3 packets through the datapath as real
// traffic: the datapath is attached at POSTROUTING in a network namespace
// of the injector's own, and the packets are sent there on raw sockets that
// carry their own IP header, so the program counts each exactly as built
// (the same bytes the bpf package's tests run it on). They leave through a
// veth whose peer is down, which drops them: the namespace has no other
// device and no route anywhere else, so nothing reaches the host's
// network.
type injector struct {
	fd4, fd6 int
	// ns is the namespace's name (netns.Path gives its path).
	ns string
}

// injectorSeq makes the namespace names of one test process distinct.
var injectorSeq atomic.Int64

// newInjector makes the namespace, attaches dp there and opens the
// sockets. Everything is removed when the test ends (after the datapath
// is closed, if that was registered later).
func newInjector(t testing.TB, dp *bpf.Datapath) *injector {
	t.Helper()
	name := fmt.Sprintf("kzn-agent-%d-%d", os.Getpid(), injectorSeq.Add(1))
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	ip("netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("removing network namespace %s: %v: %s", name, err, out)
		}
	})
	// The way out is one end of a veth pair whose other end stays down:
	// it transmits nothing (kernels without the dummy device type have
	// veth, which the other tests use too). No ARP or neighbour
	// discovery on it. A source address of each family for the route
	// lookups (the packets keep their own); no DAD, so the IPv6 one is
	// usable at once.
	ip("-n", name, "link", "add", "kzn0", "mtu", "65535", "type", "veth", "peer", "name", "kzn1", "mtu", "65535")
	ip("-n", name, "link", "set", "kzn0", "arp", "off", "up")
	ip("-n", name, "addr", "add", "192.0.2.1/32", "dev", "kzn0")
	ip("-n", name, "-6", "addr", "add", "2001:db8::1/128", "dev", "kzn0", "nodad")
	ip("-n", name, "route", "add", "default", "dev", "kzn0")
	ip("-n", name, "-6", "route", "add", "default", "dev", "kzn0")
	if err := dp.AttachNetfilter(netns.Path(name), bpf.DefaultNetfilterPriority); err != nil {
		t.Fatal(err)
	}
	inj := &injector{fd4: -1, fd6: -1, ns: name}
	t.Cleanup(func() {
		for _, fd := range []int{inj.fd4, inj.fd6} {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
	})
	err := netns.Do(netns.Path(name), func() error {
		var err error
		// IPPROTO_RAW: the packet carries its IP header (IP_HDRINCL).
		if inj.fd4, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW); err != nil {
			return fmt.Errorf("raw IPv4 socket: %w", err)
		}
		if inj.fd6, err = unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW); err != nil {
			return fmt.Errorf("raw IPv6 socket: %w", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return inj
}

// send sends the L3 packet pkt (built by internal/packet). It has gone
// through the datapath's hook when send returns: the hook runs in the
// sending call.
func (inj *injector) send(t testing.TB, pkt []byte) {
	t.Helper()
	var err error
	if pkt[0]>>4 == 6 {
		var sa unix.SockaddrInet6
		sa.Addr = [16]byte(pkt[24:40])
		err = unix.Sendto(inj.fd6, pkt, 0, &sa)
	} else {
		var sa unix.SockaddrInet4
		sa.Addr = [4]byte(pkt[16:20])
		err = unix.Sendto(inj.fd4, pkt, 0, &sa)
	}
	if err != nil {
		t.Fatalf("sending a packet to %v: %v", dstAddr(pkt), err)
	}
}

// dstAddr is pkt's destination, for messages.
func dstAddr(pkt []byte) netip.Addr {
	if pkt[0]>>4 == 6 {
		return netip.AddrFrom16([16]byte(pkt[24:40]))
	}
	return netip.AddrFrom4([4]byte(pkt[16:20]))
}
