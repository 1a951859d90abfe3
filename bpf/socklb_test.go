//go:build linux

package bpf

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// Offsets in struct bpf_sock_addr (include/uapi/linux/bpf.h), the context
// of the socket load balancer below.
const (
	sockAddrUserIP4  = 4
	sockAddrUserIP6  = 8
	sockAddrUserPort = 24
)

// sockAddrWords are an address as the words of bpf_sock_addr's user_ip4
// or user_ip6: the address bytes in network order, loaded little-endian.
func sockAddrWords(a netip.Addr) []int32 {
	b := a.AsSlice()
	w := make([]int32, len(b)/4)
	for i := range w {
		w[i] = int32(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return w
}

// sockAddrPort is a port as bpf_sock_addr's user_port word.
func sockAddrPort(p uint16) int32 { return int32(p>>8 | (p&0xff)<<8) }

// socketLB loads a cgroup/connect or cgroup/sendmsg program (attach, of
// vip's family) that does what a socket load balancer does (Cilium's
// kube-proxy replacement): a connect() or sendmsg() to vip is rewritten
// to backend, anything else is left alone, and the call always proceeds.
func socketLB(t *testing.T, attach ebpf.AttachType, vip, backend netip.AddrPort) *ebpf.Program {
	t.Helper()
	addrOff := int16(sockAddrUserIP4)
	if vip.Addr().Is6() {
		addrOff = sockAddrUserIP6
	}
	var insns asm.Instructions
	for i, w := range sockAddrWords(vip.Addr()) {
		insns = append(insns,
			asm.LoadMem(asm.R2, asm.R1, addrOff+int16(4*i), asm.Word),
			asm.JNE.Imm32(asm.R2, w, "out"))
	}
	insns = append(insns,
		asm.LoadMem(asm.R2, asm.R1, sockAddrUserPort, asm.Word),
		asm.JNE.Imm32(asm.R2, sockAddrPort(vip.Port()), "out"))
	for i, w := range sockAddrWords(backend.Addr()) {
		insns = append(insns,
			asm.Mov.Imm32(asm.R2, w),
			asm.StoreMem(asm.R1, addrOff+int16(4*i), asm.R2, asm.Word))
	}
	insns = append(insns,
		asm.Mov.Imm32(asm.R2, sockAddrPort(backend.Port())),
		asm.StoreMem(asm.R1, sockAddrUserPort, asm.R2, asm.Word),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("out"),
		asm.Return())
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "kzn_test_socklb",
		Type:         ebpf.CGroupSockAddr,
		AttachType:   attach,
		Instructions: insns,
		License:      "MIT",
	})
	if err != nil {
		t.Fatalf("loading the test socket load balancer: %v", err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

// attachSocketLB attaches the socket load balancer of vip at the hook
// attach of the cgroup at dir, appended to the hook's programs
// (link.AttachCgroup has no order).
func attachSocketLB(t *testing.T, dir string, attach ebpf.AttachType, vip, backend netip.AddrPort) {
	t.Helper()
	prog := socketLB(t, attach, vip, backend)
	l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: attach, Program: prog})
	if err != nil {
		t.Fatalf("attaching the test socket load balancer: %v", err)
	}
	t.Cleanup(func() { l.Close() })
}

// TestCgroupConnectRecords runs TCP clients in a cgroup where a socket
// load balancer rewrites a Service's virtual IP and port to a backend in
// connect(), as Cilium's kube-proxy replacement does, so no packet ever
// carries the virtual IP: the flow goes to the backend and reports the
// virtual IP and port as its original destination. A connection straight
// to the backend, which nothing rewrote, has none. IPv4 and IPv6; the
// balancer attached after the agent's programs, as the agent documents,
// and before them, which BPF_F_BEFORE orders after ours all the same.
// Each flow's bytes and packets equal an nftables counter of the client's
// TCP egress.
func TestCgroupConnectRecords(t *testing.T) {
	testutil.RequireRoot(t)
	topo := twoNodes(t, false)
	a1, b1 := topo.Pod("a1"), topo.Pod("b1")
	ref, err := testnet.InstallCounterMatch(context.Background(), a1.NS, 0, []netip.Prefix{
		netip.PrefixFrom(a1.IPv4, 32), netip.PrefixFrom(a1.IPv6, 128),
	}, "meta l4proto tcp")
	if err != nil {
		t.Fatal(err)
	}

	ap := netip.AddrPortFrom
	const payload = 256 << 10
	tests := []struct {
		name     string
		vip      netip.AddrPort // what the balancer rewrites
		backend  netip.AddrPort // to what, where the listener is
		dial     netip.AddrPort // what the client connects to
		lbBefore bool           // the balancer is attached before the datapath
		want     flow.Key
	}{
		{
			name: "tcp4 to the virtual IP", vip: ap(vip4, 80), backend: ap(b1.IPv4, 8080), dial: ap(vip4, 80),
			want: flow.Key{Src: a1.IPv4, Dst: b1.IPv4, Proto: 6, Port: 8080, PortIsDst: true, OrigDst: ap(vip4, 80)},
		},
		{
			name: "tcp4 to the backend", vip: ap(vip4, 80), backend: ap(b1.IPv4, 8080), dial: ap(b1.IPv4, 8080),
			want: flow.Key{Src: a1.IPv4, Dst: b1.IPv4, Proto: 6, Port: 8080, PortIsDst: true},
		},
		{
			name: "tcp6 to the virtual IP", vip: ap(vip6, 80), backend: ap(b1.IPv6, 8080), dial: ap(vip6, 80),
			want: flow.Key{Src: a1.IPv6, Dst: b1.IPv6, Proto: 6, Port: 8080, PortIsDst: true, OrigDst: ap(vip6, 80)},
		},
		{
			name: "tcp6 to the backend", vip: ap(vip6, 80), backend: ap(b1.IPv6, 8080), dial: ap(b1.IPv6, 8080),
			want: flow.Key{Src: a1.IPv6, Dst: b1.IPv6, Proto: 6, Port: 8080, PortIsDst: true},
		},
		{
			name: "tcp4 to the virtual IP, balancer attached first", vip: ap(vip4, 80), backend: ap(b1.IPv4, 8080), dial: ap(vip4, 80),
			lbBefore: true,
			want:     flow.Key{Src: a1.IPv4, Dst: b1.IPv4, Proto: 6, Port: 8080, PortIsDst: true, OrigDst: ap(vip4, 80)},
		},
		{
			name: "tcp6 to the virtual IP, balancer attached first", vip: ap(vip6, 80), backend: ap(b1.IPv6, 8080), dial: ap(vip6, 80),
			lbBefore: true,
			want:     flow.Key{Src: a1.IPv6, Dst: b1.IPv6, Proto: 6, Port: 8080, PortIsDst: true, OrigDst: ap(vip6, 80)},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root, dir := testCgroup(t)
			attach := ebpf.AttachCGroupInet4Connect
			if tc.vip.Addr().Is6() {
				attach = ebpf.AttachCGroupInet6Connect
			}
			if tc.lbBefore {
				attachSocketLB(t, dir, attach, tc.vip, tc.backend)
			}
			d := loadLocal(t, Config{}, a1.Node.PodCIDRs[0].String(), a1.Node.PodCIDRs[1].String())
			if err := d.AttachCgroup(dir); err != nil {
				t.Fatal(err)
			}
			if !tc.lbBefore {
				attachSocketLB(t, dir, attach, tc.vip, tc.backend)
			}
			before, err := ref.Read(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			// The backend's socket is made in the cgroup too (the
			// listener is opened by sendTCPVia); its replies are
			// b1's, not local to a1's node, and not counted.
			inCgroup(t, root, dir, func() {
				sendTCPVia(t, a1.NS, b1.NS, tc.dial, tc.backend, payload)
			})
			after, err := ref.Read(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			want := flow.Record{Key: tc.want, Counts: flow.Counts{
				Bytes: after.Bytes - before.Bytes, Packets: after.Packets - before.Packets,
			}}
			dr := drain(t, d)
			if len(dr.Flows) != 1 || dr.Flows[0] != want {
				t.Errorf("flows %+v, want %+v", dr.Flows, want)
			}
			for i, c := range dr.Uncounted {
				if Reason(i) != ReasonNotLocal && !c.IsZero() {
					t.Errorf("uncounted %s: %+v", Reason(i), c)
				}
			}
		})
	}
}

// TestCgroupSendmsgRecords: an unconnected UDP socket sends datagrams to a
// Service's virtual IP, which a socket load balancer rewrites per
// datagram in sendmsg(), and datagrams straight to the backend: the first
// are a flow to the backend with the virtual IP as original destination,
// the second one without, each with exactly the datagrams sent. IPv4 and
// IPv6.
func TestCgroupSendmsgRecords(t *testing.T) {
	testutil.RequireRoot(t)
	topo := twoNodes(t, false)
	a1, b1 := topo.Pod("a1"), topo.Pod("b1")
	ap := netip.AddrPortFrom
	for _, tc := range []struct {
		name         string
		vip, backend netip.AddrPort
		src          netip.Addr
		network      string
		attach       ebpf.AttachType
		hdr          uint64 // IP and UDP header bytes
	}{
		{"udp4", ap(vip4, 53), ap(b1.IPv4, 5353), a1.IPv4, "udp4", ebpf.AttachCGroupUDP4Sendmsg, 28},
		{"udp6", ap(vip6, 53), ap(b1.IPv6, 5353), a1.IPv6, "udp6", ebpf.AttachCGroupUDP6Sendmsg, 48},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root, dir := testCgroup(t)
			d := loadLocal(t, Config{}, a1.Node.PodCIDRs[0].String(), a1.Node.PodCIDRs[1].String())
			if err := d.AttachCgroup(dir); err != nil {
				t.Fatal(err)
			}
			attachSocketLB(t, dir, tc.attach, tc.vip, tc.backend)
			rx, err := testnet.ListenPacket(b1.NS, tc.network, tc.backend.String())
			if err != nil {
				t.Fatal(err)
			}
			defer rx.Close()
			var tx net.PacketConn
			inCgroup(t, root, dir, func() {
				tx, err = testnet.ListenPacket(a1.NS, tc.network, ap(tc.src, 0).String())
			})
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Close()
			const viaVIP, direct, size = 12, 5, 600
			buf := make([]byte, size)
			for i := range viaVIP + direct {
				to := tc.vip
				if i%3 == 2 && i/3 < direct {
					to = tc.backend
				}
				if _, err := tx.WriteTo(buf, net.UDPAddrFromAddrPort(to)); err != nil {
					t.Fatal(err)
				}
			}
			// A datagram read at the backend has gone through a1's
			// egress: read them all.
			rx.SetReadDeadline(time.Now().Add(10 * time.Second))
			for i := range viaVIP + direct {
				if _, _, err := rx.ReadFrom(buf); err != nil {
					t.Fatalf("datagram %d of %d at the backend: %v", i+1, viaVIP+direct, err)
				}
			}
			key := flow.Key{Src: tc.src, Dst: tc.backend.Addr(), Proto: 17, Port: 5353, PortIsDst: true}
			withOrig := key
			withOrig.OrigDst = tc.vip
			want := []flow.Record{
				{Key: key, Counts: flow.Counts{Bytes: direct * (size + tc.hdr), Packets: direct}},
				{Key: withOrig, Counts: flow.Counts{Bytes: viaVIP * (size + tc.hdr), Packets: viaVIP}},
			}
			got := drain(t, d).Flows
			slices.SortFunc(got, func(a, b flow.Record) int { return cmp.Compare(a.Packets, b.Packets) })
			if !slices.Equal(got, want) {
				t.Errorf("flows %+v, want %+v", got, want)
			}
		})
	}
}

// TestCgroupConnectHierarchy checks the order AttachCgroup documents
// across cgroups: the kernel runs the programs of a socket's own cgroup
// before those of its ancestors, whatever BPF_F_BEFORE says. A balancer
// in an ancestor of the agent's cgroup runs after the agent's programs,
// and the flow reports the virtual IP; one in a descendant runs first,
// and the flow, to the same backend, reports none.
func TestCgroupConnectHierarchy(t *testing.T) {
	testutil.RequireRoot(t)
	topo := twoNodes(t, false)
	a1, b1 := topo.Pod("a1"), topo.Pod("b1")
	vip, backend := netip.AddrPortFrom(vip4, 80), netip.AddrPortFrom(b1.IPv4, 8080)
	ref, err := testnet.InstallCounterMatch(context.Background(), a1.NS, 0, []netip.Prefix{netip.PrefixFrom(a1.IPv4, 32)}, "meta l4proto tcp")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name        string
		lbInChild   bool
		wantOrigDst netip.AddrPort
	}{
		{"balancer in the parent", false, vip},
		{"balancer in the child", true, netip.AddrPort{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root, parent := testCgroup(t)
			child := filepath.Join(parent, "child")
			if err := os.Mkdir(child, 0o755); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.Remove(child) })
			lbDir, ourDir := parent, child
			if tc.lbInChild {
				lbDir, ourDir = child, parent
			}
			attachSocketLB(t, lbDir, ebpf.AttachCGroupInet4Connect, vip, backend)
			d := loadLocal(t, Config{}, a1.Node.PodCIDRs[0].String())
			if err := d.AttachCgroup(ourDir); err != nil {
				t.Fatal(err)
			}
			before, err := ref.Read(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			inCgroup(t, root, child, func() {
				sendTCPVia(t, a1.NS, b1.NS, vip, backend, 128<<10)
			})
			after, err := ref.Read(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			want := flow.Record{
				Key:    flow.Key{Src: a1.IPv4, Dst: b1.IPv4, Proto: 6, Port: 8080, PortIsDst: true, OrigDst: tc.wantOrigDst},
				Counts: flow.Counts{Bytes: after.Bytes - before.Bytes, Packets: after.Packets - before.Packets},
			}
			if dr := drain(t, d); len(dr.Flows) != 1 || dr.Flows[0] != want {
				t.Errorf("flows %+v, want %+v", dr.Flows, want)
			}
		})
	}
}

// TestCgroupSocketHookTaken: a connect4 hook that holds a program attached
// without BPF_F_ALLOW_MULTI (as Cilium before 1.14 attached its own)
// refuses ours. AttachCgroup says so with ErrSocketHookTaken, and the
// datapath still counts the flows, without an original destination.
func TestCgroupSocketHookTaken(t *testing.T) {
	root, dir := testCgroup(t)
	topo := twoNodes(t, false)
	a1, b1 := topo.Pod("a1"), topo.Pod("b1")
	vip, backend := netip.AddrPortFrom(vip4, 80), netip.AddrPortFrom(b1.IPv4, 8080)
	prog := socketLB(t, ebpf.AttachCGroupInet4Connect, vip, backend)
	cg, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cg.Close() })
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{Target: int(cg.Fd()), Program: prog, Attach: ebpf.AttachCGroupInet4Connect}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := link.RawDetachProgram(link.RawDetachProgramOptions{Target: int(cg.Fd()), Program: prog, Attach: ebpf.AttachCGroupInet4Connect}); err != nil {
			t.Errorf("detaching the test socket load balancer: %v", err)
		}
	})
	d := loadLocal(t, Config{}, a1.Node.PodCIDRs[0].String())
	err = d.AttachCgroup(dir)
	if !errors.Is(err, ErrSocketHookTaken) {
		t.Fatalf("AttachCgroup: %v, want ErrSocketHookTaken", err)
	}
	t.Log(err)
	inCgroup(t, root, dir, func() {
		sendTCPVia(t, a1.NS, b1.NS, vip, backend, 64<<10)
	})
	dr := drain(t, d)
	want := flow.Key{Src: a1.IPv4, Dst: b1.IPv4, Proto: 6, Port: 8080, PortIsDst: true}
	if len(dr.Flows) != 1 || dr.Flows[0].Key != want || dr.Flows[0].Bytes < 64<<10 {
		t.Errorf("flows %+v, want one %+v of at least the payload", dr.Flows, want)
	}
}
