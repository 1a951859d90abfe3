//go:build linux

package bpf

import (
	"encoding/binary"
	"maps"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/packet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// TestWaitQuiescentIsBounded plays CPUs whose in-flight counter never
// returns to zero (no kernel needed: the counters are plain memory here):
// the wait gives up once its deadline has passed, names those CPUs, and
// says it waited at least that long. With every counter at zero it does
// not wait at all.
func TestWaitQuiescentIsBounded(t *testing.T) {
	d := &Datapath{inflight: make([]flowCpuInflight, 4)}
	if waited, stuck := d.waitQuiescent(time.Hour, nil); waited != 0 || len(stuck) != 0 {
		t.Fatalf("all quiescent: waited %v, stuck %v; want no wait, none stuck", waited, stuck)
	}
	d.inflight[1].N = 1
	d.inflight[3].N = 2
	const timeout = 20 * time.Millisecond
	waited, stuck := d.waitQuiescent(timeout, make([]int, 0, 4))
	if !slices.Equal(stuck, []int{1, 3}) {
		t.Errorf("stuck = %v, want [1 3]", stuck)
	}
	if waited < timeout {
		t.Errorf("waited %v, want at least the timeout %v", waited, timeout)
	}
}

// TestDrainGoesOnWithoutAStuckCPU: a CPU's in-flight counter that never
// returns to zero (set by the test through the shared mapping, as in
// TestDrainWaitsForProgramsInFlight) does not hang the drain: past its
// deadline the drain goes on, returns what was counted, and names the CPU.
// Once the counter is back at zero, drains neither wait nor report.
func TestDrainGoesOnWithoutAStuckCPU(t *testing.T) {
	testutil.RequireRoot(t)
	d := loadLocal(t, Config{}, "10.0.0.0/8")
	cpu := d.nCPU - 1
	runNF(t, d, packet.IPv4(t, 6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.0.1:443"), 100, 0))
	atomic.StoreUint32(&d.inflight[cpu].N, 1)

	const timeout = 50 * time.Millisecond
	var dr Drained
	if err := d.drain(&dr, timeout); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(dr.Stuck, []int{cpu}) {
		t.Errorf("stuck = %v, want [%d]", dr.Stuck, cpu)
	}
	if dr.Waited < timeout {
		t.Errorf("waited %v, want at least the timeout %v", dr.Waited, timeout)
	}
	if got := total(dr.Flows); got.Packets != 1 {
		t.Errorf("drained %d packets, want the 1 sent before the drain", got.Packets)
	}

	atomic.StoreUint32(&d.inflight[cpu].N, 0)
	if err := d.drain(&dr, timeout); err != nil {
		t.Fatal(err)
	}
	if len(dr.Stuck) != 0 || dr.Waited != 0 {
		t.Errorf("after the counter returned to zero: stuck %v, waited %v; want none", dr.Stuck, dr.Waited)
	}
}

// kernelKey is the kernel's form of k (the inverse of convertKey).
func kernelKey(k flow.Key) flowFlowKey {
	kk := flowFlowKey{Saddr: k.Src.As16(), Daddr: k.Dst.As16(), Port: k.Port, Proto: k.Proto}
	if k.PortIsDst {
		kk.Flags |= uint8(flowFlowFlagFLOW_F_PORT_DST)
	}
	if k.Dst.Is6() {
		kk.Flags |= uint8(flowFlowFlagFLOW_F_IPV6)
	}
	if k.OrigDst.IsValid() {
		kk.Flags |= uint8(flowFlowFlagFLOW_F_ORIG_DST)
		kk.OrigDaddr, kk.OrigPort = k.OrigDst.Addr().As16(), k.OrigDst.Port()
	}
	return kk
}

// TestDrainTableOriginalDestination reads table slots laid out as the
// kernel writes them (no kernel needed: the table and the CPUs' lines are
// plain memory here): a flow's original destination address is its slot's
// last word, after the IPv4-mapped prefix (IPv4) or its CPU's IPv6 prefix
// of the generation (IPv6), only when its flags say it has one (where a
// flow without one would keep it lies what an earlier flow left, and its
// CPU has an IPv6 prefix); two flows that differ only in it stay two
// flows, each CPU's IPv6 prefix is its own, and a flow seen on two CPUs is
// merged, with or without one.
func TestDrainTableOriginalDestination(t *testing.T) {
	const slots = 64
	d := &Datapath{nCPU: 2, regionSlots: slots, slots: [2]int{slots, slots}, epochs: [2]uint32{1, 2}}
	d.table = make([]flowTableSlot, 2*d.nCPU*slots)
	d.inflight = make([]flowCpuInflight, d.nCPU)
	addr, ap := netip.MustParseAddr, netip.MustParseAddrPort
	viaA := flow.Key{Src: addr("10.244.1.2"), Dst: addr("10.244.2.2"), Proto: 6, Port: 8080, PortIsDst: true, OrigDst: ap("10.96.0.10:80")}
	viaB := viaA
	viaB.OrigDst = ap("10.96.0.11:80")
	direct := viaA
	direct.OrigDst = netip.AddrPort{}
	v6 := flow.Key{Src: addr("fd00::1"), Dst: addr("fd00::2"), Proto: 17, Port: 5353, PortIsDst: true, OrigDst: ap("[fd00:96::10]:53")}
	v6b := v6 // same prefix, another last word
	v6b.OrigDst = ap("[fd00:96::1:11]:53")
	v6c := v6 // another prefix, on the other CPU
	v6c.OrigDst = ap("[fd01:97:0:1::10]:53")
	put := func(cpu, i int, k flow.Key, c flow.Counts) {
		idx := d.regionStart(0, cpu) + i
		kk := kernelKey(k)
		s := &d.table[idx]
		*s = flowTableSlot{Epoch: d.epochs[0], St: flowFlowStats{Bytes: c.Bytes, Packets: c.Packets}}
		s.Key = *(*keyHead)(unsafe.Pointer(&kk))
		// Where a flow keeps no original destination address lies
		// whatever an earlier flow left there.
		s.OrigDaddr4 = binary.LittleEndian.Uint32([]byte{10, 96, 8, byte(i)})
		if k.OrigDst.IsValid() {
			s.OrigDaddr4 = binary.LittleEndian.Uint32(kk.OrigDaddr[12:])
		}
		if k.OrigDst.Addr().Is6() {
			for w := range d.inflight[cpu].Orig6[0] {
				d.inflight[cpu].Orig6[0][w] = binary.LittleEndian.Uint32(kk.OrigDaddr[4*w:])
			}
		}
	}
	put(0, 3, viaA, flow.Counts{Bytes: 100, Packets: 1})
	put(0, 9, viaB, flow.Counts{Bytes: 200, Packets: 2})
	put(0, 20, direct, flow.Counts{Bytes: 300, Packets: 3})
	put(1, 5, viaA, flow.Counts{Bytes: 400, Packets: 4})
	put(1, 6, v6, flow.Counts{Bytes: 500, Packets: 5})
	put(1, 7, direct, flow.Counts{Bytes: 600, Packets: 6})
	put(1, 8, v6b, flow.Counts{Bytes: 700, Packets: 7})
	put(0, 30, v6c, flow.Counts{Bytes: 800, Packets: 8})
	var dr Drained
	d.merge.reset()
	d.drainTable(0, &dr)
	got := map[flow.Key]flow.Counts{}
	for _, f := range dr.Flows {
		if _, dup := got[f.Key]; dup {
			t.Errorf("flow %s drained twice", keyString(f.Key))
		}
		got[f.Key] = f.Counts
	}
	want := map[flow.Key]flow.Counts{
		viaA:   {Bytes: 500, Packets: 5},
		viaB:   {Bytes: 200, Packets: 2},
		direct: {Bytes: 900, Packets: 9},
		v6:     {Bytes: 500, Packets: 5},
		v6b:    {Bytes: 700, Packets: 7},
		v6c:    {Bytes: 800, Packets: 8},
	}
	if !maps.Equal(got, want) {
		t.Errorf("drained %v, want %v", got, want)
	}
}

// TestKeyHashSpreads: keys that differ in one field only spread over the
// merger's index, whose slot is the hash's low bits. 4,096 keys into
// 4,096 buckets fill 1 - 1/e of them (63%) when the hash is uniform; a
// hash whose low bits miss a field fills a handful, and the drain then
// probes runs of thousands of slots per flow (BenchmarkDrain).
func TestKeyHashSpreads(t *testing.T) {
	const n = 4096
	base := flow.Key{Src: netip.MustParseAddr("10.244.1.2"), Dst: netip.MustParseAddr("10.244.2.2"), Proto: 6, Port: 443, PortIsDst: true}
	v4 := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}) }
	v6 := func(i int) netip.Addr {
		a := netip.MustParseAddr("fd00::").As16()
		a[14], a[15] = byte(i>>8), byte(i)
		return netip.AddrFrom16(a)
	}
	tests := []struct {
		name string
		key  func(i int) flow.Key
	}{
		{"ipv4 source", func(i int) flow.Key { k := base; k.Src = v4(i); return k }},
		{"ipv4 destination", func(i int) flow.Key { k := base; k.Dst = v4(i); return k }},
		{"ipv6 destination", func(i int) flow.Key {
			k := base
			k.Src, k.Dst = netip.MustParseAddr("fd00::1"), v6(i)
			return k
		}},
		{"port", func(i int) flow.Key { k := base; k.Port = uint16(i); return k }},
		{"ipv4 original destination", func(i int) flow.Key { k := base; k.OrigDst = netip.AddrPortFrom(v4(i), 80); return k }},
		{"original port", func(i int) flow.Key {
			k := base
			k.OrigDst = netip.AddrPortFrom(netip.MustParseAddr("10.96.0.10"), uint16(i))
			return k
		}},
		{"ipv6 original destination", func(i int) flow.Key {
			k := base
			k.Src, k.Dst, k.OrigDst = netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00::2"), netip.AddrPortFrom(v6(i), 80)
			return k
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// 8-byte aligned, as the drain's keys.
			keys := make([]struct {
				_ [0]uint64
				k flowFlowKey
			}, n)
			buckets := map[uint32]bool{}
			for i := range keys {
				keys[i].k = kernelKey(tt.key(i))
				buckets[keyHash(&keys[i].k)&(n-1)] = true
			}
			if len(buckets) < n/2 {
				t.Errorf("%d keys fill %d of %d buckets, want at least %d", n, len(buckets), n, n/2)
			}
		})
	}
}
