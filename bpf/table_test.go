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

// TestTableGeometry splits the memory bound per CPU: half for the
// table's two generations (the largest power of two of 64-byte slots,
// capped), the rest for the slots' tags and the log's ring (the largest
// power of two of 64-byte records, capped), never more than the bound,
// and an error naming the CPU count and the bound when either falls below
// its minimum.
func TestTableGeometry(t *testing.T) {
	tests := []struct {
		memory         uint64
		ncpu           int
		slots, records int
		err            string // substring of the error, "" for none
	}{
		{DefaultTableMemory, 1, MaxTableSlots, MaxLogRecords, ""}, // 16.5 MiB
		{DefaultTableMemory, 2, MaxTableSlots, MaxLogRecords, ""}, // 33 MiB
		{DefaultTableMemory, 3, MaxTableSlots, MaxLogRecords, ""}, // 49.5 MiB
		{DefaultTableMemory, 4, MaxTableSlots, 131072, ""},        // 34 MiB
		{DefaultTableMemory, 64, 4096, 4096, ""},                  // 48.5 MiB
		{DefaultTableMemory, 192, 1024, 2048, ""},                 // 48.4 MiB
		{DefaultTableMemory, 4096, 64, 64, ""},                    // exactly the minimum
		{32 << 20, 4096, 0, 0, "flow table memory 32 MiB: 4096 possible CPUs need at least 64 MiB"},
		{1 << 20, 1, 4096, 4096, ""}, // the tags take the ring's other half
		{1 << 20, 2, 2048, 2048, ""},
		{1<<20 + 2*4096, 1, 4096, 8192, ""},         // room for them
		{MinTableSlots * 4 * 2 * 64, 2, 64, 64, ""}, // exactly the minimum
		{MinTableSlots*4*2*64 - 1, 2, 0, 0, "flow table memory 32767 bytes: 2 possible CPUs need at least 32 KiB"},
		{1 << 20, 192, 0, 0, "flow table memory 1 MiB: 192 possible CPUs need at least 3 MiB"},
		{0, 1, 0, 0, "need at least"},
	}
	for _, tt := range tests {
		slots, records, err := TableGeometry(tt.memory, tt.ncpu)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("TableGeometry(%d, %d) = %d, %d, %v; want an error containing %q", tt.memory, tt.ncpu, slots, records, err, tt.err)
			}
			continue
		}
		if err != nil || slots != tt.slots || records != tt.records {
			t.Errorf("TableGeometry(%d, %d) = %d, %d, %v; want %d, %d", tt.memory, tt.ncpu, slots, records, err, tt.slots, tt.records)
		}
		if bytes := (uint64(slots)*2*(tableSlotBytes+tagBytes) + uint64(records)*logRecordBytes) * uint64(tt.ncpu); err == nil && bytes > tt.memory {
			t.Errorf("TableGeometry(%d, %d) = %d, %d: %d bytes, more than the bound", tt.memory, tt.ncpu, slots, records, bytes)
		}
	}
}

// TestTableSizer feeds the sizer the busiest CPU's flows of successive
// intervals: it grows at once, to a power of two with room for twice the
// flows, never beyond the region or below the floor, and shrinks only
// after tableShrinkAfter intervals that needed less. counts adds a CPU's
// flows from the room its region used, the log and its spills.
func TestTableSizer(t *testing.T) {
	const region = 1 << 17
	s := newTableSizer(region, 2)
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
		{1 << 20, region}, // capped at the region
		{0, region},
		{0, region},
		{0, region},
		{0, region},
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
	// CPU 0 used 10 of its room of 128, logged 5 flows, spilled none;
	// CPU 1 used all of it, logged 300 flows, and spilled 3 (then 7,
	// across a wrap of the kernel's count).
	room, sp, logged := []uint32{118, 0}, []uint32{0, 1<<32 - 5}, []int{5, 300}
	two := newTableSizer(256, 2)
	counts := func() (int, int) {
		return two.counts(128, func(c int) uint32 { return room[c] }, func(c int) uint32 { return sp[c] }, func(c int) int { return logged[c] })
	}
	if busiest, spills := counts(); busiest != 128+300+(1<<32-5) || spills != 1<<32-5 {
		t.Errorf("first counts: busiest %d, spills %d", busiest, spills)
	}
	sp[1], logged[1] = 2, 0 // wrapped: 7 more spilled
	if busiest, spills := counts(); busiest != 128+7 || spills != 7 {
		t.Errorf("counts across a wrap: busiest %d, spills %d; want %d, 7", busiest, spills, 128+7)
	}
	room[1] = 128
	if busiest, spills := counts(); busiest != 15 || spills != 0 {
		t.Errorf("counts of a quiet CPU 1: busiest %d, spills %d; want 15, 0", busiest, spills)
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

// setTable makes every CPU's region use slots slots (room for slots/2
// flows) in both generations, from now on: the sizer may not grow it.
func setTable(d *Datapath, slots int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.sizer = newTableSizer(slots, d.nCPU)
	d.setSlots(0, slots)
	d.setSlots(1, slots)
}

// sendTwice sends every packet of pkts twice on CPU 0.
func sendTwice(t *testing.T, d *Datapath, pkts [][]byte) {
	t.Helper()
	sendOnCPU0(t, d, pkts)
	sendOnCPU0(t, d, pkts)
}

// TestTableFullLogs sends more flows from one CPU than its table region
// has room for, twice, in three intervals: the flows that came first keep
// counting in the table, every packet of the rest is a record of the flow
// log, and each flow comes back once with exactly what was sent.
func TestTableFullLogs(t *testing.T) {
	testutil.RequireRoot(t)
	const slots, flows = 64, 300
	d := loadLocal(t, Config{MaxFlows: 1024}, "10.0.0.0/8")
	setTable(d, slots)
	pkts := flowPkts(t, flows)
	for round := range 3 {
		sendTwice(t, d, pkts)
		if n := liveSlots(d, 0); n != slots/2 {
			t.Errorf("round %d: %d table slots in use, want the room, %d", round, n, slots/2)
		}
		dr := drain(t, d)
		checkTwice(t, fmt.Sprintf("round %d", round), dr, flows)
		if want := 2 * (flows - slots/2); dr.Logged != want || dr.Spilled != 0 {
			t.Errorf("round %d: %d records logged, %d flows spilled; want %d and 0", round, dr.Logged, dr.Spilled, want)
		}
	}
}

// TestTableTagsEachTurn sends, in each of six intervals, as many new
// flows as one CPU's region has room for, other flows each time: every
// flow takes a slot and none is logged. A generation's tags are cleared
// before its next turn (setSlots): left, the tags of the flows of its last
// turn would read as slots taken, and push flows beyond TABLE_PROBES into
// the log.
func TestTableTagsEachTurn(t *testing.T) {
	testutil.RequireRoot(t)
	const slots, room = 64, 32
	d := loadLocal(t, Config{MaxFlows: 1024}, "10.0.0.0/8")
	setTable(d, slots)
	pkts := flowPkts(t, 6*room)
	for round := range 6 {
		sendTwice(t, d, pkts[round*room:(round+1)*room])
		if n := liveSlots(d, 0); n != room {
			t.Errorf("round %d: %d table slots in use, want %d", round, n, room)
		}
		dr := drain(t, d)
		checkTwice(t, fmt.Sprintf("round %d", round), dr, room)
		if dr.Logged != 0 || dr.Spilled != 0 {
			t.Errorf("round %d: %d records logged, %d flows spilled; want none", round, dr.Logged, dr.Spilled)
		}
	}
}

// TestLogFullSpillsToHash: while the log is not read, its ring fills, and
// the packets of flows beyond go to the hash map; all are exact.
func TestLogFullSpillsToHash(t *testing.T) {
	testutil.RequireRoot(t)
	const slots, flows = 64, 300 // a ring of 128 records
	d := loadLocal(t, Config{TableMemory: tableMemoryFor(t, slots), MaxFlows: 1024}, "10.0.0.0/8")
	release := holdLog(t, d)
	sendTwice(t, d, flowPkts(t, flows))
	release()
	dr := drain(t, d)
	checkTwice(t, "ring full", dr, flows)
	// The table took the first 32 flows and the ring the first packets
	// of the next 128; every flow beyond the table then went to the hash
	// map, those 128 with their second packet.
	if dr.Logged != 2*slots || dr.Spilled != flows-slots/2 {
		t.Errorf("%d records logged, %d flows spilled; want %d and %d", dr.Logged, dr.Spilled, 2*slots, flows-slots/2)
	}
}

// TestLogMergesWithTable sends flows 0-99 from CPU 0 and 50-149 from CPU
// 1 into tables with room for 32 flows each: flows 50-81 are in CPU 1's
// table and CPU 0's log, 82-99 in both CPUs' logs. Each flow comes back
// once, with what both CPUs counted.
func TestLogMergesWithTable(t *testing.T) {
	testutil.RequireRoot(t)
	const slots = 64
	d := loadLocal(t, Config{MaxFlows: 1024}, "10.0.0.0/8")
	if d.nCPU < 2 {
		t.Skip("needs 2 CPUs")
	}
	setTable(d, slots)
	pkts := flowPkts(t, 150)
	for cpu, sent := range [][][]byte{pkts[:100], pkts[50:]} {
		testutil.OnCPU(t, cpu, func() {
			for _, p := range sent {
				runNF(t, d, p)
			}
		})
	}
	if n0, n1 := liveSlots(d, 0), liveSlots(d, 1); n0 != slots/2 || n1 != slots/2 {
		t.Fatalf("table slots in use: CPU 0 %d, CPU 1 %d; want %d each", n0, n1, slots/2)
	}
	dr := drain(t, d)
	if len(dr.Flows) != 150 {
		t.Fatalf("%d flows, want 150", len(dr.Flows))
	}
	seen := map[netip.Addr]bool{}
	for _, f := range dr.Flows {
		if seen[f.Dst] {
			t.Errorf("flow to %v drained twice", f.Dst)
		}
		seen[f.Dst] = true
		i := int(f.Dst.As4()[2])<<8 | int(f.Dst.As4()[3])
		n := uint64(1)
		if i >= 50 && i < 100 {
			n = 2
		}
		if want := (flow.Counts{Bytes: n * uint64(100+i), Packets: n}); f.Counts != want {
			t.Errorf("flow to %v: %+v, want %+v", f.Dst, f.Counts, want)
		}
	}
	if want := 100 - slots/2 + 100 - slots/2; dr.Logged != want {
		t.Errorf("%d records logged, want %d", dr.Logged, want)
	}
}

// TestLogFlowsBound: the log's sum holds at most MaxFlows flows between
// drains; the records of other flows wait in the ring, and the drain reads
// them all, exactly.
func TestLogFlowsBound(t *testing.T) {
	testutil.RequireRoot(t)
	const slots, flows, bound = 64, 300, 50
	d := loadLocal(t, Config{MaxFlows: bound}, "10.0.0.0/8")
	setTable(d, slots)
	release := holdLog(t, d)
	sendTwice(t, d, flowPkts(t, flows))
	d.pollLog(nil)
	l := d.logs[0]
	if len(d.logSum.used) != bound || l.Head == l.Tail {
		t.Errorf("after a read: %d flows in the log's sum, ring at %d of %d; want %d flows and records left", len(d.logSum.used), l.Tail, l.Head, bound)
	}
	release()
	dr := drain(t, d)
	checkTwice(t, "bounded", dr, flows)
	if dr.Logged != 2*(flows-slots/2) || dr.Spilled != 0 {
		t.Errorf("%d records logged, %d flows spilled; want %d and 0", dr.Logged, dr.Spilled, 2*(flows-slots/2))
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
	checkSent(t, what, dr, flows, 1)
}

// checkTwice is checkDrained for flows sent twice (sendTwice).
func checkTwice(t *testing.T, what string, dr *Drained, flows int) {
	t.Helper()
	checkSent(t, what, dr, flows, 2)
}

// checkSent is checkDrained for flows sent n times each.
func checkSent(t *testing.T, what string, dr *Drained, flows int, n uint64) {
	t.Helper()
	if len(dr.Flows) != flows {
		t.Fatalf("%s: %d flows, want %d", what, len(dr.Flows), flows)
	}
	for _, f := range dr.Flows {
		i := int(f.Dst.As4()[2])<<8 | int(f.Dst.As4()[3])
		if want := (flow.Counts{Bytes: n * uint64(100+i%1000), Packets: n}); f.Counts != want {
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

// TestTableGrowsThenShrinks: quiet intervals shrink the table to the
// floor, after tableShrinkAfter drains; then more new flows from one CPU
// than the floor has room for: the flows beyond go to the log, and the
// drain sizes the next generation for all of them at once, so the same
// flows in the next interval all find a slot. Every drain's counts are
// exact.
func TestTableGrowsThenShrinks(t *testing.T) {
	testutil.RequireRoot(t)
	const flows, grown = 1500, 4096 // a power of two >= 2 * flows
	d := loadLocal(t, Config{MaxFlows: 16384}, "10.0.0.0/8")
	if d.slots != [2]int{tableStartSlots, tableStartSlots} {
		t.Fatalf("slots in use at load: %v, want %d in both generations", d.slots, tableStartSlots)
	}
	pkts := flowPkts(t, flows)
	quiet := pkts[:10]
	for i := 1; i <= tableShrinkAfter+1; i++ {
		sendOnCPU0(t, d, quiet)
		dr := drain(t, d)
		checkDrained(t, "quiet drain", dr, len(quiet))
		want := tableStartSlots
		if i >= tableShrinkAfter {
			want = tableFloorSlots
		}
		if dr.TableSlots != want {
			t.Errorf("quiet drain %d: %d slots in use, want %d", i, dr.TableSlots, want)
		}
	}
	if d.slots != [2]int{tableFloorSlots, tableFloorSlots} {
		t.Fatalf("slots in use after the quiet drains: %v, want %d in both", d.slots, tableFloorSlots)
	}

	sendOnCPU0(t, d, pkts)
	if n := liveSlots(d, 0); n != tableFloorSlots/2 {
		t.Fatalf("%d flows in a table of %d slots, want its room, %d", n, tableFloorSlots, tableFloorSlots/2)
	}
	dr := drain(t, d)
	checkDrained(t, "burst", dr, flows)
	if dr.Logged != flows-tableFloorSlots/2 || dr.Spilled != 0 {
		t.Errorf("burst: %d records logged, %d flows spilled; want %d and 0", dr.Logged, dr.Spilled, flows-tableFloorSlots/2)
	}
	if dr.TableSlots != grown || d.slots[d.active] != grown {
		t.Fatalf("after the burst: %d slots in use (%v), want %d", dr.TableSlots, d.slots, grown)
	}
	sendOnCPU0(t, d, pkts)
	if n := liveSlots(d, 0); n != flows {
		t.Errorf("next interval: %d flows in the table, want all %d", n, flows)
	}
	dr = drain(t, d)
	checkDrained(t, "next interval", dr, flows)
	if dr.Logged != 0 {
		t.Errorf("next interval: %d records logged, want none", dr.Logged)
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
