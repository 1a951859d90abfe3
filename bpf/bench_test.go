//go:build linux

package bpf

import (
	"net/netip"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/kubezonnet/kubezonnet/internal/packet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// emptyNetfilter is the baseline: a netfilter program that only accepts.
func emptyNetfilter(b *testing.B) *ebpf.Program {
	b.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.Netfilter,
		AttachType:   ebpf.AttachNetfilter,
		License:      "MIT",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}

// progTestRun issues BPF_PROG_TEST_RUN directly and returns the kernel's
// own time per run. Program.Benchmark cannot pass the netfilter hook state
// (which the program reads to tell IPv4 from IPv6), and wall-clock time
// would include whatever else the machine runs: the kernel's timer stops
// while the loop is rescheduled.
func progTestRun(b *testing.B, prog *ebpf.Program, pkt []byte, repeat uint32) time.Duration {
	b.Helper()
	ctx := nfHookState{Hook: nfInetLocalOut, PF: nfprotoIPv4}
	if pkt[0]>>4 == 6 {
		ctx.PF = nfprotoIPv6
	}
	attr := struct {
		progFD, retval, dataSizeIn, dataSizeOut uint32
		dataIn, dataOut                         uint64
		repeat, duration                        uint32
		ctxSizeIn, ctxSizeOut                   uint32
		ctxIn, ctxOut                           uint64
		flags, cpu, batchSize                   uint32
		_                                       uint32
	}{
		progFD: uint32(prog.FD()), dataSizeIn: uint32(len(pkt)),
		dataIn:    uint64(uintptr(unsafe.Pointer(&pkt[0]))),
		repeat:    repeat,
		ctxSizeIn: uint32(unsafe.Sizeof(ctx)), ctxIn: uint64(uintptr(unsafe.Pointer(&ctx))),
	}
	for {
		_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_TEST_RUN, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
		runtime.KeepAlive(pkt)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			b.Fatalf("BPF_PROG_TEST_RUN: %v", errno)
		}
		return time.Duration(attr.duration)
	}
}

// benchRun reports the kernel-measured time per run of prog on pkt as
// kernel-ns/op (b.N runs in batches of up to a million).
func benchRun(b *testing.B, prog *ebpf.Program, pkt []byte) {
	b.Helper()
	progTestRun(b, prog, pkt, 1) // insert the flow
	b.ResetTimer()
	var total time.Duration
	for left := b.N; left > 0; {
		n := min(left, 1_000_000)
		total += progTestRun(b, prog, pkt, uint32(n)) * time.Duration(n)
		left -= n
	}
	b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "kernel-ns/op")
}

// BenchmarkNetfilter measures the program on a 1,440-byte TCP packet of a
// flow that already exists, next to an empty netfilter program in the same
// run: the difference is the cost of counting.
func BenchmarkNetfilter(b *testing.B) {
	testutil.RequireRoot(b)
	ap := netip.MustParseAddrPort
	v4 := packet.IPv4(b, 6, ap("10.0.0.1:40000"), ap("10.1.0.2:443"), 1440, 0)
	v6 := packet.IPv6(b, 6, ap("[fd00::1]:40000"), ap("[fd00:1::2]:443"), 1440, false)
	b.Run("empty", func(b *testing.B) { benchRun(b, emptyNetfilter(b), v4) })
	b.Run("existing-flow-ipv4", func(b *testing.B) {
		d := loadLocal(b, Config{}, "10.0.0.0/24")
		benchRun(b, d.objs.KznNetfilter, v4)
	})
	b.Run("existing-flow-ipv6", func(b *testing.B) {
		d := loadLocal(b, Config{}, "fd00::/64")
		benchRun(b, d.objs.KznNetfilter, v6)
	})
	b.Run("not-local", func(b *testing.B) {
		d := loadLocal(b, Config{}, "10.9.0.0/24")
		benchRun(b, d.objs.KznNetfilter, v4)
	})
}

// BenchmarkNetfilterNewFlow measures runs that insert a new flow: every run
// is a packet to a distinct destination, run once (repeat 1), so the
// kernel's per-run timer is used; the empty program is measured the same
// way for the baseline (repeat 1 adds ~70 ns of timer overhead to both).
// 60,000 flows per generation overflow the per-CPU cache, so most runs
// insert into the hash map (the worst case); "new-flow-cache" drains every
// 2,000 flows, so each new flow finds a free cache slot (the common case
// on a node with fewer than a few thousand flows per CPU per interval).
func BenchmarkNetfilterNewFlow(b *testing.B) {
	testutil.RequireRoot(b)
	benchNewFlow(b, 60_000, "new-flow-hash")
	benchNewFlow(b, 2_000, "new-flow-cache")
}

func benchNewFlow(b *testing.B, flows int, name string) {
	pkts := make([][]byte, flows)
	for i := range pkts {
		dst := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		pkts[i] = packet.IPv4(b, 6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.AddrPortFrom(dst, 443), 1440, 0)
	}
	run := func(b *testing.B, prog *ebpf.Program, reset func()) {
		var total time.Duration
		for i := 0; i < b.N; i++ {
			if i%flows == 0 && reset != nil {
				b.StopTimer()
				reset()
				b.StartTimer()
			}
			total += progTestRun(b, prog, pkts[i%flows], 1)
		}
		b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "kernel-ns/op")
	}
	b.Run(name+"-empty", func(b *testing.B) { run(b, emptyNetfilter(b), nil) })
	b.Run(name, func(b *testing.B) {
		d := loadLocal(b, Config{MaxFlows: 65536}, "10.0.0.0/24")
		var dr Drained
		run(b, d.objs.KznNetfilter, func() {
			if err := d.Drain(&dr); err != nil {
				b.Fatal(err)
			}
			if !dr.Uncounted[ReasonMapFull].IsZero() {
				b.Fatalf("map full during the benchmark: %+v", dr.Uncounted[ReasonMapFull])
			}
		})
	})
}

// BenchmarkDrain measures draining a generation of 100,000 flows.
func BenchmarkDrain(b *testing.B) {
	testutil.RequireRoot(b)
	const flows = 100_000
	d := loadLocal(b, Config{MaxFlows: 131072}, "10.0.0.0/24")
	pkts := make([][]byte, flows)
	for i := range pkts {
		dst := netip.AddrFrom4([4]byte{10, byte(1 + i>>16), byte(i >> 8), byte(i)})
		pkts[i] = packet.IPv4(b, 6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.AddrPortFrom(dst, 443), 100, 0)
	}
	var dr Drained
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		for _, p := range pkts {
			runNF(b, d, p)
		}
		b.StartTimer()
		if err := d.Drain(&dr); err != nil {
			b.Fatal(err)
		}
		if len(dr.Flows) != flows {
			b.Fatalf("drained %d flows, want %d", len(dr.Flows), flows)
		}
	}
}
