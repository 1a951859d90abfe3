//go:build linux

package reference

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/kubezonnet/kubezonnet/bpf/internal/nfhook"
	"github.com/kubezonnet/kubezonnet/internal/packet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// TestCounts checks that the yardstick counts what the benchmark assumes
// it counts: tot_len per packet of a pair inside the subnet (a new pair,
// then an existing one), nothing outside it or for IPv6.
func TestCounts(t *testing.T) {
	testutil.RequireRoot(t)
	p, err := Load(netip.MustParsePrefix("10.0.0.0/8"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })

	ap := netip.MustParseAddrPort
	run := func(pkt []byte) {
		t.Helper()
		ret, err := p.Netfilter().Run(&ebpf.RunOptions{Data: pkt, Context: nfhook.ForPacket(pkt)})
		if err != nil || ret != 1 {
			t.Fatalf("run: verdict %d, %v; want NF_ACCEPT (1)", ret, err)
		}
	}
	run(packet.IPv4(t, 6, ap("10.0.0.1:40000"), ap("10.1.0.2:443"), 1440, 0))
	run(packet.IPv4(t, 6, ap("10.0.0.1:40000"), ap("10.1.0.2:443"), 600, 0))
	run(packet.IPv4(t, 6, ap("10.0.0.1:40000"), ap("192.168.0.2:443"), 1440, 0))
	run(packet.IPv6(t, 6, ap("[fd00::1]:40000"), ap("[fd00:1::2]:443"), 1440, false))

	for _, c := range []struct {
		src, dst string
		want     uint64
		present  bool
	}{
		{"10.0.0.1", "10.1.0.2", 2040, true},
		{"10.0.0.1", "192.168.0.2", 0, false},
	} {
		got, ok, err := p.Bytes(netip.MustParseAddr(c.src), netip.MustParseAddr(c.dst))
		if err != nil || got != c.want || ok != c.present {
			t.Errorf("%s -> %s: %d bytes, present %v, err %v; want %d, %v", c.src, c.dst, got, ok, err, c.want, c.present)
		}
	}
	if _, _, err := p.Bytes(netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00:1::2")); err == nil {
		t.Error("Bytes accepted an IPv6 pair")
	}
	if _, err := Load(netip.MustParsePrefix("fd00::/8")); err == nil {
		t.Error("Load accepted an IPv6 subnet")
	}
}
