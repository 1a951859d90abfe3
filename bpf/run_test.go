//go:build linux

package bpf

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kubezonnet/kubezonnet/bpf/internal/nfhook"
	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/packet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// runNF runs the netfilter program once on pkt, as BPF_PROG_TEST_RUN does:
// exactly once (repeat 1 cannot be interrupted and re-run).
func runNF(t testing.TB, d *Datapath, pkt []byte) {
	t.Helper()
	ret, err := d.objs.KznNetfilter.Run(&ebpf.RunOptions{Data: pkt, Context: nfhook.ForPacket(pkt)})
	if err != nil {
		t.Fatal(err)
	}
	if ret != 1 {
		t.Fatalf("program returned %d, want NF_ACCEPT", ret)
	}
}

// loadLocal loads the datapath with cfg and sets its local prefixes.
func loadLocal(t testing.TB, cfg Config, prefixes ...string) *Datapath {
	t.Helper()
	return loadWith(t, Load, cfg, prefixes...)
}

// tableMemoryFor is the flow table memory bound of 4 x slots slots per
// CPU on this machine, and the tags of 2 x slots: for a power of two up
// to MaxTableSlots, a region of exactly slots slots and a ring of the flow
// log of twice as many records; beyond, a region of MaxTableSlots and the
// rest of the share in the ring.
func tableMemoryFor(t testing.TB, slots int) uint64 {
	t.Helper()
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	return uint64(slots) * uint64(ncpu) * (4*tableSlotBytes + 2*tagBytes)
}

// holdLog keeps the flow log's reader from reading until the test's end
// or the returned release, whichever comes first: the rings then fill.
func holdLog(t testing.TB, d *Datapath) (release func()) {
	d.mu.Lock()
	var once sync.Once
	release = func() { once.Do(d.mu.Unlock) }
	t.Cleanup(release)
	return release
}

// loadWith is loadLocal loading with load (Load, or a benchmark variant
// of export_test.go).
func loadWith(t testing.TB, load func(Config) (*Datapath, error), cfg Config, prefixes ...string) *Datapath {
	t.Helper()
	d, err := load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	var ps []netip.Prefix
	for _, p := range prefixes {
		ps = append(ps, netip.MustParsePrefix(p))
	}
	if err := d.SetLocalPrefixes(ps); err != nil {
		t.Fatal(err)
	}
	return d
}

// TestParse feeds hand-built packets to the program and checks the flow
// each lands in, including the cases real traffic rarely produces.
func TestParse(t *testing.T) {
	testutil.RequireRoot(t)
	ap := netip.MustParseAddrPort
	tests := []struct {
		name    string
		pkt     func(t testing.TB) []byte
		want    flow.Key
		wantLen uint64
		reason  Reason // when not counted in a flow
	}{
		{
			name: "ipv4 tcp to service",
			pkt:  func(t testing.TB) []byte { return packet.IPv4(t, 6, ap("10.0.0.1:40000"), ap("10.1.0.2:80"), 1440, 0) },
			want: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.1.0.2"), Proto: 6, Port: 80, PortIsDst: true},
		},
		{
			name: "ipv4 udp reply from service",
			pkt:  func(t testing.TB) []byte { return packet.IPv4(t, 17, ap("10.0.0.1:53"), ap("10.1.0.2:33000"), 100, 0) },
			want: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.1.0.2"), Proto: 17, Port: 53},
		},
		{
			name: "ipv4 later fragment has no ports",
			pkt: func(t testing.TB) []byte {
				return packet.IPv4(t, 17, ap("10.0.0.1:53"), ap("10.1.0.2:33000"), 600, 185)
			},
			want: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.1.0.2"), Proto: 17},
		},
		{
			name: "ipv4 first fragment keyed like the others",
			pkt: func(t testing.TB) []byte {
				return packet.IPv4(t, 17, ap("10.0.0.1:53"), ap("10.1.0.2:33000"), 600, 0x2000)
			},
			want: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.1.0.2"), Proto: 17},
		},
		{
			name: "ipv4 with options",
			pkt: func(t testing.TB) []byte {
				b := packet.IPv4(t, 6, ap("10.0.0.1:40000"), ap("10.1.0.2:443"), 200, 0)
				// Grow the header to 24 bytes and move the TCP ports.
				b[0] = 0x46
				copy(b[24:], b[20:40])
				return b
			},
			want: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.1.0.2"), Proto: 6, Port: 443, PortIsDst: true},
		},
		{
			name: "ipv6 tcp",
			pkt: func(t testing.TB) []byte {
				return packet.IPv6(t, 6, ap("[fd00::1]:50000"), ap("[fd00:1::2]:5432"), 1000, false)
			},
			want: flow.Key{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00:1::2"), Proto: 6, Port: 5432, PortIsDst: true},
		},
		{
			name: "ipv6 udp behind a destination options header",
			pkt: func(t testing.TB) []byte {
				return packet.IPv6(t, 17, ap("[fd00::1]:123"), ap("[fd00:1::2]:123"), 300, true)
			},
			want: flow.Key{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00:1::2"), Proto: 17, Port: 123, PortIsDst: true},
		},
		// The shortest packets: every header read must stay within the
		// bytes there are (the parser reads headers in 64-bit words).
		{
			name: "ipv4 last fragment of one byte",
			pkt: func(t testing.TB) []byte {
				return shorten(packet.IPv4(t, 17, ap("10.0.0.1:53"), ap("10.1.0.2:33000"), 40, 185), 21)
			},
			want: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.1.0.2"), Proto: 17},
		},
		{
			name: "ipv4 header only, a protocol without ports",
			pkt: func(t testing.TB) []byte {
				return shorten(packet.IPv4(t, 47, ap("10.0.0.1:0"), ap("10.1.0.2:0"), 40, 0), 20)
			},
			want: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.1.0.2"), Proto: 47},
		},
		{
			name: "ipv4 udp with an empty payload",
			pkt: func(t testing.TB) []byte {
				return shorten(packet.IPv4(t, 17, ap("10.0.0.1:33000"), ap("10.1.0.2:53"), 40, 0), 28)
			},
			want: flow.Key{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.1.0.2"), Proto: 17, Port: 53, PortIsDst: true},
		},
		{
			name: "ipv6 header only, no next header",
			pkt: func(t testing.TB) []byte {
				b := shorten(packet.IPv6(t, 6, ap("[fd00::1]:50000"), ap("[fd00:1::2]:5432"), 68, false), 40)
				b[6] = 59 // IPPROTO_NONE
				return b
			},
			want: flow.Key{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00:1::2"), Proto: 59},
		},
		{
			name:   "source not local",
			pkt:    func(t testing.TB) []byte { return packet.IPv4(t, 6, ap("10.9.0.1:40000"), ap("10.0.0.1:80"), 500, 0) },
			reason: ReasonNotLocal,
		},
		{
			name: "not ip",
			pkt: func(t testing.TB) []byte {
				b := packet.IPv4(t, 6, ap("10.0.0.1:40000"), ap("10.1.0.2:80"), 60, 0)
				b[0] = 0x55
				return b
			},
			reason: ReasonParseError,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := loadLocal(t, Config{MaxFlows: 64}, "10.0.0.0/24", "fd00::/64")
			pkt := tt.pkt(t)
			runNF(t, d, pkt)
			runNF(t, d, pkt)
			dr := drain(t, d)
			want := flow.Counts{Bytes: 2 * uint64(len(pkt)), Packets: 2}
			if tt.reason != 0 || tt.want == (flow.Key{}) {
				if len(dr.Flows) != 0 {
					t.Fatalf("counted flows %+v, want none", dr.Flows)
				}
				if got := dr.Uncounted[tt.reason]; got != want {
					t.Fatalf("uncounted[%s] = %+v, want %+v", tt.reason, got, want)
				}
				return
			}
			if len(dr.Flows) != 1 {
				t.Fatalf("flows = %+v, want one", dr.Flows)
			}
			if dr.Flows[0].Key != tt.want {
				t.Errorf("key = %+v, want %+v", dr.Flows[0].Key, tt.want)
			}
			if dr.Flows[0].Counts != want {
				t.Errorf("counts = %+v, want %+v", dr.Flows[0].Counts, want)
			}
		})
	}
}

// shorten cuts b to n bytes and sets the IP length field to match.
func shorten(b []byte, n int) []byte {
	b = b[:n]
	if b[0]>>4 == 4 {
		binary.BigEndian.PutUint16(b[2:], uint16(n))
	} else {
		binary.BigEndian.PutUint16(b[4:], uint16(n-40))
	}
	return b
}

// TestOverflowCountsEveryRefusedByte fills a small flow map with more
// distinct flows than it and the flow table hold: whatever is not in a
// flow must be in the map_full counter, so counted + overflow = sent,
// exactly.
func TestOverflowCountsEveryRefusedByte(t *testing.T) {
	testutil.RequireRoot(t)
	const capacity, flows, slots = 32, 20000, 64
	d := loadLocal(t, Config{MaxFlows: capacity, TableMemory: tableMemoryFor(t, slots)}, "10.0.0.0/8")
	var sent flow.Counts
	for i := range flows {
		dst := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		size := 100 + i%200
		pkt := packet.IPv4(t, 17, netip.MustParseAddrPort("10.0.0.1:5000"), netip.AddrPortFrom(dst, 53), size, 0)
		for range 1 + i%2 {
			runNF(t, d, pkt)
			sent.Add(flow.Counts{Bytes: uint64(size), Packets: 1})
		}
	}
	dr := drain(t, d)
	counted := total(dr.Flows)
	full := dr.Uncounted[ReasonMapFull]
	// The hash map, the table's room, the log's sum and what its rings
	// held at the drain.
	if max := capacity + slots/2*d.nCPU + capacity + 2*slots*d.nCPU; len(dr.Flows) > max || len(dr.Flows) == 0 {
		t.Errorf("%d flows, want at most %d: a map of %d, a table of %d slots a CPU, a log of %d records a CPU summing %d flows", len(dr.Flows), max, capacity, slots, 2*slots, capacity)
	}
	if full.IsZero() {
		t.Fatal("nothing counted as map_full although the map overflowed")
	}
	if counted.Bytes+full.Bytes != sent.Bytes || counted.Packets+full.Packets != sent.Packets {
		t.Errorf("counted %+v + map_full %+v != sent %+v", counted, full, sent)
	}
	// After a drain the next generation has room again.
	runNF(t, d, packet.IPv4(t, 6, netip.MustParseAddrPort("10.0.0.1:5000"), netip.MustParseAddrPort("10.2.0.1:80"), 60, 0))
	if dr := drain(t, d); len(dr.Flows) != 1 || !dr.Uncounted[ReasonMapFull].IsZero() {
		t.Errorf("after drain: %d flows, map_full %+v; want 1 flow, nothing refused", len(dr.Flows), dr.Uncounted[ReasonMapFull])
	}
}

// TestDrainUnderLoadLosesNothing runs the program on both CPUs as fast as
// BPF_PROG_TEST_RUN allows while another goroutine drains in a tight loop.
// The reference is the kernel's own run counter for the program
// (BPF_ENABLE_STATS), which the datapath cannot influence: the sum of all
// drains must equal runs x packet length.
func TestDrainUnderLoadLosesNothing(t *testing.T) {
	testutil.RequireRoot(t)
	for round := range 3 {
		drainUnderLoad(t, round, nil)
	}
}

// TestDrainWhileResizingLosesNothing is TestDrainUnderLoadLosesNothing
// with every drain giving the next generation another size (1,024 and
// 4,096 slots in turn, where the flows' slots differ): program instances
// that read a generation's geometry as it changes must neither count into
// a slot the drain does not read nor count twice.
func TestDrainWhileResizingLosesNothing(t *testing.T) {
	testutil.RequireRoot(t)
	sizes := 0
	drainUnderLoad(t, 0, func(d *Datapath, n int) {
		// The drain asks the sizer for the largest size of the latest
		// intervals: make that the size wanted for this turn. Drains
		// alternate between the generations, so each generation gets
		// the other size on its next turn.
		want := tableFloorSlots
		if n%4 < 2 {
			want = tableStartSlots
		}
		for i := range d.sizer.wants {
			d.sizer.wants[i] = want
		}
		if d.slots[1-d.active] != want {
			sizes++
		}
	})
	if sizes < 10 {
		t.Errorf("the generations changed size only %d times", sizes)
	}
}

// drainUnderLoad is the body of TestDrainUnderLoadLosesNothing: beforeDrain,
// when not nil, runs before the n-th drain of the loop (in the draining
// goroutine, the only one to drain).
func drainUnderLoad(t *testing.T, round int, beforeDrain func(d *Datapath, n int)) {
	t.Helper()
	stats, err := ebpf.EnableStats(uint32(0)) // BPF_STATS_RUN_TIME
	if err != nil {
		t.Fatalf("enabling BPF run statistics: %v", err)
	}
	defer stats.Close()
	d := loadLocal(t, Config{}, "10.0.0.0/8")
	info, err := d.objs.KznNetfilter.Stats()
	if err != nil {
		t.Fatal(err)
	}
	before := info.RunCount
	const size = 1440
	var pkts [][]byte
	for i := range 16 {
		dst := netip.AddrFrom4([4]byte{10, 1, 0, byte(i)})
		pkts = append(pkts, packet.IPv4(t, 6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.AddrPortFrom(dst, 443), size, 0))
	}
	var wg sync.WaitGroup
	var stop atomic.Bool
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 40; i++ {
				pkt := pkts[(w*8+i)%len(pkts)]
				// Repeat may run the program more often than
				// asked when interrupted; the run counter below
				// counts what really ran.
				if _, err := d.objs.KznNetfilter.Run(&ebpf.RunOptions{
					Data: pkt, Repeat: 50_000,
					Context: nfhook.ForPacket(pkt),
				}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	var got flow.Counts
	drains := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		var dr Drained
		for !stop.Load() {
			if beforeDrain != nil {
				beforeDrain(d, drains)
			}
			if err := d.Drain(&dr); err != nil {
				t.Error(err)
				return
			}
			got.Add(total(dr.Flows))
			drains++
		}
	}()
	wg.Wait()
	stop.Store(true)
	<-done
	got.Add(total(drain(t, d).Flows))
	info, err = d.objs.KznNetfilter.Stats()
	if err != nil {
		t.Fatal(err)
	}
	runs := info.RunCount - before
	t.Logf("round %d: %d runs, %d drains, counted %+v", round, runs, drains, got)
	if drains < 10 {
		t.Errorf("only %d drains raced with the load", drains)
	}
	if got.Packets != runs || got.Bytes != runs*size {
		t.Errorf("round %d: counted %+v, the kernel ran the program %d times (%d bytes): lost %d packets", round, got, runs, runs*size, int64(runs)-int64(got.Packets))
	}
}

// TestDrainWaitsForProgramsInFlight: a drain switches generations, then
// does not return while a CPU's in-flight counter says a program may
// still be counting into the old generation; it reports how long it
// waited. A packet counted meanwhile lands in the new generation: not in
// this drain, in the next. The test stands in for a preempted program by
// setting the counter itself: a real preemption inside a BPF program
// cannot be staged on demand.
func TestDrainWaitsForProgramsInFlight(t *testing.T) {
	testutil.RequireRoot(t)
	d := loadLocal(t, Config{}, "10.0.0.0/8")
	cpu := uint32(d.nCPU - 1)
	setInflight := func(n uint32) {
		t.Helper()
		// Through the shared mapping, as a program would: a map
		// update would also overwrite the CPU's active generation.
		atomic.StoreUint32(&d.inflight[cpu].N, n)
	}
	pkt := packet.IPv4(t, 6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.0.1:443"), 100, 0)
	runNF(t, d, pkt) // counted in the generation the drain takes

	setInflight(1)
	type result struct {
		dr  Drained
		err error
	}
	done := make(chan result, 1)
	go func() {
		var r result
		r.err = d.Drain(&r.dr)
		done <- r
	}()
	const held = 100 * time.Millisecond
	select {
	case r := <-done:
		t.Fatalf("drain returned (err %v) while CPU %d had a program in flight", r.err, cpu)
	case <-time.After(held):
	}
	runNF(t, d, pkt) // the generation was switched before the wait
	setInflight(0)
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if got := total(r.dr.Flows); got.Packets != 1 {
		t.Errorf("drain during the wait: %d packets, want the 1 sent before it", got.Packets)
	}
	if r.dr.Waited < held/2 {
		t.Errorf("drain reported waiting %v, it was held for %v", r.dr.Waited, held)
	}
	next := drain(t, d)
	if got := total(next.Flows); got.Packets != 1 {
		t.Errorf("next drain: %d packets, want the 1 sent during the wait", got.Packets)
	}
	if next.Waited != 0 {
		t.Errorf("next drain waited %v with no program in flight", next.Waited)
	}
}
