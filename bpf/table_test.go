//go:build linux

package bpf

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/packet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		cfg  Config
		want string // substring of the error, "" for none
	}{
		{Config{}, ""},
		{Config{TableMemory: 1 << 20}, ""},
		{Config{TableMemory: MaxTableBytes}, ""},
		{Config{TableMemory: MaxTableBytes + 1}, "more than the 2048 MiB allowed"},
	}
	for _, tt := range tests {
		err := tt.cfg.Validate()
		if tt.want == "" && err != nil {
			t.Errorf("%+v: unexpected error %v", tt.cfg, err)
		}
		if tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("%+v: error %v, want one containing %q", tt.cfg, err, tt.want)
		}
	}
}

// TestTableSlots computes each CPU's region from the memory bound and the
// CPU count: the largest power of two of 64-byte slots that fits twice
// (two generations) per CPU, capped, and an error naming the CPU count
// and the bound when not even MinTableSlots fit.
func TestTableSlots(t *testing.T) {
	tests := []struct {
		memory uint64
		ncpu   int
		want   int
		err    string // substring of the error, "" for none
	}{
		{DefaultTableMemory, 1, MaxTableSlots, ""}, // 16 MiB
		{DefaultTableMemory, 2, MaxTableSlots, ""}, // 32 MiB
		{DefaultTableMemory, 4, MaxTableSlots, ""}, // 64 MiB
		{DefaultTableMemory, 5, 65536, ""},         // 40 MiB
		{DefaultTableMemory, 64, 8192, ""},         // 64 MiB
		{DefaultTableMemory, 192, 2048, ""},        // 48 MiB
		{DefaultTableMemory, 8192, 64, ""},         // exactly the minimum
		{32 << 20, 8192, 0, "flow table memory 32 MiB: 8192 possible CPUs need at least 64 MiB"},
		{1 << 20, 1, 8192, ""},                  // 8,192 fit
		{MinTableSlots * 2 * 2 * 64, 2, 64, ""}, // exactly the minimum
		{MinTableSlots*2*2*64 - 1, 2, 0, "flow table memory 16383 bytes: 2 possible CPUs need at least 16 KiB"},
		{1 << 20, 192, 0, "flow table memory 1 MiB: 192 possible CPUs need at least 1536 KiB"},
		{0, 1, 0, "need at least"},
	}
	for _, tt := range tests {
		got, err := TableSlots(tt.memory, tt.ncpu)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("TableSlots(%d, %d) = %d, %v; want an error containing %q", tt.memory, tt.ncpu, got, err, tt.err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("TableSlots(%d, %d) = %d, %v; want %d", tt.memory, tt.ncpu, got, err, tt.want)
		}
		if bytes := uint64(got) * 2 * uint64(tt.ncpu) * tableSlotBytes; err == nil && bytes > tt.memory {
			t.Errorf("TableSlots(%d, %d) = %d: %d bytes, more than the bound", tt.memory, tt.ncpu, got, bytes)
		}
	}
}

// TestTableSizer feeds the sizer the busiest CPU's flows of successive
// intervals: it grows at once, to a power of two with room for twice the
// flows, never beyond the region or below the floor, and shrinks only
// after tableShrinkAfter intervals that needed less.
func TestTableSizer(t *testing.T) {
	s := newTableSizer(MaxTableSlots, 2)
	if got := s.start(); got != tableStartSlots {
		t.Fatalf("start %d, want %d", got, tableStartSlots)
	}
	steps := []struct {
		flows, want int
	}{
		{100, tableStartSlots}, // the start size stays for tableShrinkAfter intervals
		{9000, 32768},          // grows at once
		{16384, 32768},         // exactly half full
		{16385, 65536},
		{1 << 20, MaxTableSlots}, // capped at the region
		{0, MaxTableSlots},
		{0, MaxTableSlots},
		{0, MaxTableSlots},
		{0, MaxTableSlots},
		{0, tableFloorSlots}, // five quiet intervals: the floor
		{600, 2048},
		{0, 2048},
	}
	for i, st := range steps {
		if got := s.observe(st.flows); got != st.want {
			t.Errorf("step %d: %d flows: %d slots, want %d", i, st.flows, got, st.want)
		}
	}
	small := newTableSizer(256, 1)
	if got := small.start(); got != 256 {
		t.Errorf("start of a 256-slot region: %d", got)
	}
	if got := small.observe(1000); got != 256 {
		t.Errorf("a 256-slot region asked for 1000 flows: %d slots", got)
	}
	var in, sp = []uint32{10, 1<<32 - 5}, []uint32{0, 3}
	busiest, spills := small.counts(func(c int) uint32 { return in[c%2] }, func(c int) uint32 { return sp[c%2] })
	if busiest != 10 || spills != 0 {
		t.Errorf("first counts: busiest %d, spills %d; want 10, 0", busiest, spills)
	}
	two := newTableSizer(256, 2)
	two.counts(func(c int) uint32 { return in[c] }, func(c int) uint32 { return sp[c] })
	in[1], sp[1] = 20, 7 // wrapped: 25 more inserted
	busiest, spills = two.counts(func(c int) uint32 { return in[c] }, func(c int) uint32 { return sp[c] })
	if busiest != 29 || spills != 4 {
		t.Errorf("counts across a wrap: busiest %d, spills %d; want 29, 4", busiest, spills)
	}
}

// liveSlots counts the slots of the active table generation in use on cpu,
// read from the shared mapping, as the datapath left them.
func liveSlots(d *Datapath, cpu int) int {
	g := d.active
	n := 0
	slots, _ := d.region(g, cpu)
	for _, s := range slots {
		if s.Epoch == d.epochs[g] {
			n++
		}
	}
	return n
}

// TestFlowSeenOnSeveralCPUs sends one flow from two CPUs (a sender that
// migrated) and another from one: each CPU counts in its own table region,
// and the drain returns each flow once with the sum.
func TestFlowSeenOnSeveralCPUs(t *testing.T) {
	testutil.RequireRoot(t)
	d := loadLocal(t, Config{}, "10.0.0.0/8")
	if d.nCPU < 2 {
		t.Skip("needs 2 CPUs")
	}
	ap := netip.MustParseAddrPort
	a := packet.IPv4(t, 6, ap("10.0.0.1:40000"), ap("10.1.0.1:443"), 1000, 0)
	b := packet.IPv4(t, 17, ap("10.0.0.1:40000"), ap("10.1.0.2:53"), 300, 0)
	testutil.OnCPU(t, 0, func() {
		for range 3 {
			runNF(t, d, a)
		}
	})
	testutil.OnCPU(t, 1, func() {
		for range 2 {
			runNF(t, d, a)
		}
		runNF(t, d, b)
	})
	if n0, n1 := liveSlots(d, 0), liveSlots(d, 1); n0 != 1 || n1 != 2 {
		t.Fatalf("table slots in use: CPU 0 %d, CPU 1 %d; want 1 and 2", n0, n1)
	}
	dr := drain(t, d)
	got := map[flow.Key]flow.Counts{}
	for _, f := range dr.Flows {
		if _, dup := got[f.Key]; dup {
			t.Errorf("flow %v drained twice", f.Key)
		}
		got[f.Key] = f.Counts
	}
	want := map[flow.Key]flow.Counts{
		{Src: ap("10.0.0.1:0").Addr(), Dst: ap("10.1.0.1:0").Addr(), Proto: 6, Port: 443, PortIsDst: true}: {Bytes: 5000, Packets: 5},
		{Src: ap("10.0.0.1:0").Addr(), Dst: ap("10.1.0.2:0").Addr(), Proto: 17, Port: 53, PortIsDst: true}: {Bytes: 300, Packets: 1},
	}
	if len(got) != len(want) {
		t.Fatalf("drained %v, want %v", got, want)
	}
	for k, c := range want {
		if got[k] != c {
			t.Errorf("flow %v: %+v, want %+v", k, got[k], c)
		}
	}
	if n := liveSlots(d, 0) + liveSlots(d, 1); n != 0 {
		t.Errorf("%d slots in use in the new generation, want 0", n)
	}
}

// TestTableFullSpillsToHash sends more flows from one CPU than its table
// region holds, twice: flows that found a slot keep counting there, the
// rest are counted in the hash map, and each comes back once with exactly
// what was sent; nothing is refused while the hash map has room.
func TestTableFullSpillsToHash(t *testing.T) {
	testutil.RequireRoot(t)
	const slots, flows = 64, 300
	d := loadLocal(t, Config{TableMemory: tableMemoryFor(t, slots), MaxFlows: 1024}, "10.0.0.0/8")
	pkts := make([][]byte, flows)
	for i := range pkts {
		dst := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		pkts[i] = packet.IPv4(t, 6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.AddrPortFrom(dst, 443), 100+i, 0)
	}
	for round := range 3 {
		testutil.OnCPU(t, 0, func() {
			for range 2 {
				for _, p := range pkts {
					runNF(t, d, p)
				}
			}
		})
		if n := liveSlots(d, 0); n != slots {
			t.Errorf("round %d: %d table slots in use, want all %d", round, n, slots)
		}
		dr := drain(t, d)
		if len(dr.Flows) != flows {
			t.Fatalf("round %d: %d flows, want %d", round, len(dr.Flows), flows)
		}
		for _, f := range dr.Flows {
			i := int(f.Dst.As4()[2])<<8 | int(f.Dst.As4()[3])
			if want := (flow.Counts{Bytes: 2 * uint64(100+i), Packets: 2}); f.Counts != want {
				t.Errorf("round %d: flow to %v: %+v, want %+v", round, f.Dst, f.Counts, want)
			}
		}
		for r, c := range dr.Uncounted {
			if !c.IsZero() {
				t.Errorf("round %d: %s %+v, want nothing", round, Reason(r), c)
			}
		}
	}
}

// TestBenchHookCompiledOut checks that the benchmark-only code in account()
// is absent from the program the agent loads: the verifier removes it
// because bench_new_flows is a load-time constant 0. Were it not removed,
// both programs would be the same length, since only a constant differs.
func TestBenchHookCompiledOut(t *testing.T) {
	testutil.RequireRoot(t)
	xlated := func(benchNewFlows bool) int {
		load := Load
		if benchNewFlows {
			load = loadBenchNewFlows
		}
		d := loadWith(t, load, Config{}, "10.0.0.0/8")
		info, err := d.objs.KznNetfilter.Info()
		if err != nil {
			t.Fatal(err)
		}
		insns, err := info.Instructions()
		if err != nil {
			t.Fatalf("reading the loaded program: %v", err)
		}
		// And it behaves: one packet twice is one flow, or two.
		pkt := packet.IPv4(t, 6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.0.1:443"), 100, 0)
		runNF(t, d, pkt)
		runNF(t, d, pkt)
		want := 1
		if benchNewFlows {
			want = 2
		}
		if n := len(drain(t, d).Flows); n != want {
			t.Errorf("benchNewFlows=%v: %d flows, want %d", benchNewFlows, n, want)
		}
		return len(insns)
	}
	prod, bench := xlated(false), xlated(true)
	t.Logf("instructions: production %d, benchmark %d", prod, bench)
	if prod >= bench {
		t.Errorf("production program has %d instructions, the benchmark variant %d: the benchmark code was not removed", prod, bench)
	}
}

// sendOnCPU0 runs every packet of pkts once through the netfilter program
// on CPU 0.
func sendOnCPU0(t *testing.T, d *Datapath, pkts [][]byte) {
	t.Helper()
	testutil.OnCPU(t, 0, func() {
		for _, p := range pkts {
			runNF(t, d, p)
		}
	})
}

// checkDrained checks that dr holds each of the flows of flowPkts (sent
// once, 10.0.0.1 to 10.1.x.y port 443 with a length of 100 + i) exactly,
// and nothing was lost.
func checkDrained(t *testing.T, what string, dr *Drained, flows int) {
	t.Helper()
	if len(dr.Flows) != flows {
		t.Fatalf("%s: %d flows, want %d", what, len(dr.Flows), flows)
	}
	for _, f := range dr.Flows {
		i := int(f.Dst.As4()[2])<<8 | int(f.Dst.As4()[3])
		if want := (flow.Counts{Bytes: uint64(100 + i%1000), Packets: 1}); f.Counts != want {
			t.Errorf("%s: flow to %v: %+v, want %+v", what, f.Dst, f.Counts, want)
		}
	}
	for r, c := range dr.Uncounted {
		if !c.IsZero() {
			t.Errorf("%s: %s %+v, want nothing", what, Reason(r), c)
		}
	}
}

// flowPkts returns one packet for each of n flows from 10.0.0.1.
func flowPkts(t *testing.T, n int) [][]byte {
	pkts := make([][]byte, n)
	for i := range pkts {
		dst := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		pkts[i] = packet.IPv4(t, 6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.AddrPortFrom(dst, 443), 100+i%1000, 0)
	}
	return pkts
}

// TestTableGrowsThenShrinks sends more new flows from one CPU in one
// interval than the table starts with: those that find no slot are
// counted in the hash map, and the drain sizes the next generation for
// them, so the same flows in the next interval all find a slot. Quiet
// intervals then shrink it, after tableShrinkAfter drains. Every drain's
// counts are exact.
func TestTableGrowsThenShrinks(t *testing.T) {
	testutil.RequireRoot(t)
	const flows, grown = 9000, 32768 // a power of two >= 2 * flows
	d := loadLocal(t, Config{TableMemory: tableMemoryFor(t, 2*grown), MaxFlows: 16384}, "10.0.0.0/8")
	if d.slots != [2]int{tableStartSlots, tableStartSlots} {
		t.Fatalf("slots in use at load: %v, want %d in both generations", d.slots, tableStartSlots)
	}
	pkts := flowPkts(t, flows)

	sendOnCPU0(t, d, pkts)
	inTable := liveSlots(d, 0)
	if inTable > tableStartSlots || inTable < tableStartSlots/2 {
		t.Fatalf("%d flows in a table of %d slots", inTable, tableStartSlots)
	}
	dr := drain(t, d)
	checkDrained(t, "first drain", dr, flows)
	if dr.Spilled != flows-inTable {
		t.Errorf("first drain: %d flows spilled, %d were not in the table", dr.Spilled, flows-inTable)
	}
	if dr.SpilledAtCap {
		t.Errorf("first drain: spilled at the cap, with room for %d slots per CPU", d.regionSlots)
	}
	if dr.TableSlots != grown || d.slots[d.active] != grown {
		t.Fatalf("after the first drain: %d slots in use (%v), want %d", dr.TableSlots, d.slots, grown)
	}

	sendOnCPU0(t, d, pkts)
	if n := liveSlots(d, 0); n != flows {
		t.Errorf("second interval: %d flows in the table, want all %d", n, flows)
	}
	dr = drain(t, d)
	checkDrained(t, "second drain", dr, flows)
	if dr.Spilled != 0 {
		t.Errorf("second drain: %d flows spilled, want none", dr.Spilled)
	}

	// Quiet intervals: a few flows each. The size holds for
	// tableShrinkAfter drains after the last busy one, then drops to the
	// floor.
	quiet := pkts[:10]
	for i := 1; i <= tableShrinkAfter; i++ {
		sendOnCPU0(t, d, quiet)
		dr = drain(t, d)
		checkDrained(t, "quiet drain", dr, len(quiet))
		want := grown
		if i == tableShrinkAfter {
			want = tableFloorSlots
		}
		if dr.TableSlots != want {
			t.Errorf("quiet drain %d: %d slots in use, want %d", i, dr.TableSlots, want)
		}
	}
	// Both generations shrink; the grown one was drained whole.
	sendOnCPU0(t, d, quiet)
	dr = drain(t, d)
	checkDrained(t, "shrunk", dr, len(quiet))
	if d.slots != [2]int{tableFloorSlots, tableFloorSlots} {
		t.Errorf("slots in use after the quiet drains: %v, want %d in both", d.slots, tableFloorSlots)
	}
	// A burst into the shrunk table spills and is counted exactly.
	sendOnCPU0(t, d, pkts)
	dr = drain(t, d)
	checkDrained(t, "burst", dr, flows)
	if dr.Spilled < flows-tableFloorSlots || dr.TableSlots != grown {
		t.Errorf("burst into %d slots: %d spilled, next generation %d slots; want at least %d and %d", tableFloorSlots, dr.Spilled, dr.TableSlots, flows-tableFloorSlots, grown)
	}
}

// TestTableSpillsAtCap: when the memory bound allows no more slots than
// the flows of one CPU fill, the drain says so (SpilledAtCap), and the
// table stays at the cap.
func TestTableSpillsAtCap(t *testing.T) {
	testutil.RequireRoot(t)
	const slots, flows = 256, 1000
	d := loadLocal(t, Config{TableMemory: tableMemoryFor(t, slots), MaxFlows: 4096}, "10.0.0.0/8")
	pkts := flowPkts(t, flows)
	for round := range 2 {
		sendOnCPU0(t, d, pkts)
		dr := drain(t, d)
		checkDrained(t, "at cap", dr, flows)
		if dr.TableSlots != slots || !dr.SpilledAtCap || dr.Spilled < flows-slots {
			t.Errorf("round %d: %d slots, spilled %d (at cap %t); want %d slots, at least %d spilled at the cap", round, dr.TableSlots, dr.Spilled, dr.SpilledAtCap, slots, flows-slots)
		}
	}
}

// TestLoadRefusesTooLittleTableMemory: a bound that cannot give every
// possible CPU MinTableSlots slots is refused at load, naming the CPU
// count and the bound.
func TestLoadRefusesTooLittleTableMemory(t *testing.T) {
	testutil.RequireRoot(t)
	d, err := Load(Config{TableMemory: 4096})
	if err == nil {
		d.Close()
		t.Fatal("loaded a flow table of 4 KiB")
	}
	ncpu, _ := ebpf.PossibleCPU()
	if want := fmt.Sprintf("flow table memory 4 KiB: %d possible CPUs need at least", ncpu); !strings.Contains(err.Error(), want) {
		t.Errorf("error %q, want one containing %q", err, want)
	}
}
