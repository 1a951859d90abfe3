//go:build linux

package bpf

import (
	"net/netip"
	"strings"
	"testing"

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
		{Config{TableSlots: 64}, ""},
		{Config{TableSlots: 1 << 20}, ""},
		{Config{TableSlots: 32}, "at least 64"},
		{Config{TableSlots: 1000}, "power of two"},
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
	d := loadLocal(t, Config{TableSlots: slots, MaxFlows: 1024}, "10.0.0.0/8")
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
