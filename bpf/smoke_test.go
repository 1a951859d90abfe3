package bpf

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

func TestSmoke(t *testing.T) {
	testutil.RequireRoot(t)
	d, err := Load(Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.SetLocalPrefixes([]netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}); err != nil {
		t.Fatal(err)
	}
	pkt := ipv4Packet(t, 6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.0.0.2:80"), 1440, 0)
	ret, err := d.objs.KznNetfilter.Run(&ebpf.RunOptions{Data: pkt, Repeat: 10})
	t.Log(ret, err)
	var dr Drained
	if err := d.Drain(&dr); err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", dr)
}
