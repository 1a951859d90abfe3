//go:build linux

package bpf

import (
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cilium/ebpf"

	"github.com/kubezonnet/kubezonnet/bpf/internal/nfhook"
	"github.com/kubezonnet/kubezonnet/bpf/reference"
	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/packet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// emptyNetfilter is the baseline: a netfilter program that only accepts.
func emptyNetfilter(b *testing.B) *ebpf.Program {
	b.Helper()
	p, err := testutil.EmptyNetfilter()
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
//
// A signal interrupts the kernel's repeat loop (EINTR) after it has run the
// program some unknown number of times, and the retry runs it again: the
// flow's counts no longer say how often it ran. The Go runtime preempts
// goroutines with SIGURG (it hit 2 of the first 22 runs of
// BenchmarkNetfilterReference at 5 million runs each), so the call blocks
// SIGURG on its thread; interruptions by other signals are counted in
// testRunRetries.
func progTestRun(b testing.TB, prog *ebpf.Program, pkt []byte, repeat uint32) time.Duration {
	b.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var urg, mask unix.Sigset_t
	urg.Val[0] = 1 << (unix.SIGURG - 1)
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &urg, &mask); err != nil {
		b.Fatalf("block SIGURG: %v", err)
	}
	defer unix.PthreadSigmask(unix.SIG_SETMASK, &mask, nil)
	ctx := nfhook.ForPacket(pkt)
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
			testRunRetries.Add(1)
			continue
		}
		if errno != 0 {
			b.Fatalf("BPF_PROG_TEST_RUN: %v", errno)
		}
		return time.Duration(attr.duration)
	}
}

// testRunRetries counts the BPF_PROG_TEST_RUN calls progTestRun retried
// after a signal (see there).
var testRunRetries atomic.Int64

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

// benchProg is a program and the packet it runs on.
type benchProg struct {
	prog *ebpf.Program
	pkt  []byte
}

// benchPaired reports the kernel-measured time per run of a program on
// its packet (kernel-ns/op), that of the empty program on pkt
// (empty-ns/op), and their difference (net-ns/op): the cost of counting.
// The two run in alternating batches of 100,000, so that both see the
// same machine state: on our test machines the host's state can slow
// every run by a third to a half for seconds at a time, which measured
// one after the other would land on one side of the difference only.
// With several programs, each one's figures are kernel0-ns/op and
// net0-ns/op, kernel1-ns/op and net1-ns/op and so on, in the order given,
// and all alternate in each batch.
func benchPaired(b *testing.B, pkt []byte, progs ...benchProg) {
	b.Helper()
	const batch = 100_000
	empty := emptyNetfilter(b)
	for _, p := range progs {
		progTestRun(b, p.prog, p.pkt, 1) // insert the flow
	}
	b.ResetTimer()
	var base time.Duration
	totals := make([]time.Duration, len(progs))
	for left := b.N; left > 0; {
		n := min(left, batch)
		base += progTestRun(b, empty, pkt, uint32(n)) * time.Duration(n)
		for i, p := range progs {
			totals[i] += progTestRun(b, p.prog, p.pkt, uint32(n)) * time.Duration(n)
		}
		left -= n
	}
	b.StopTimer()
	perRun := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / float64(b.N) }
	b.ReportMetric(perRun(base), "empty-ns/op")
	if len(progs) == 1 {
		b.ReportMetric(perRun(totals[0]), "kernel-ns/op")
		b.ReportMetric(perRun(totals[0]-base), "net-ns/op")
		return
	}
	for i, t := range totals {
		b.ReportMetric(perRun(t), fmt.Sprintf("kernel%d-ns/op", i))
		b.ReportMetric(perRun(t-base), fmt.Sprintf("net%d-ns/op", i))
	}
}

// netfilterCase is one of the packets the netfilter benchmarks run: a
// 1,440-byte TCP packet whose source is, or is not, in the local prefix.
type netfilterCase struct {
	name, prefix string
	pkt          []byte
}

func netfilterCases(b *testing.B) []netfilterCase {
	ap := netip.MustParseAddrPort
	v4 := packet.IPv4(b, 6, ap("10.0.0.1:40000"), ap("10.1.0.2:443"), 1440, 0)
	v6 := packet.IPv6(b, 6, ap("[fd00::1]:40000"), ap("[fd00:1::2]:443"), 1440, false)
	return []netfilterCase{
		{"existing-flow-ipv4", "10.0.0.0/24", v4},
		{"existing-flow-ipv6", "fd00::/64", v6},
		{"not-local", "10.9.0.0/24", v4},
	}
}

// BenchmarkNetfilter measures the program on a 1,440-byte TCP packet of a
// flow that already exists, and of a source that is not local (parsed,
// then only tallied), each paired with the empty netfilter program.
func BenchmarkNetfilter(b *testing.B) {
	testutil.RequireRoot(b)
	for _, c := range netfilterCases(b) {
		b.Run(c.name, func(b *testing.B) {
			d := loadLocal(b, Config{}, c.prefix)
			benchPaired(b, c.pkt, benchProg{d.objs.KznNetfilter, c.pkt})
		})
	}
}

// BenchmarkNetfilterObjects compares builds of the program in one process:
// the empty program and each object listed in KZN_BENCH_OBJECTS (bpf2go
// outputs, e.g. `git show <commit>:bpf/flow_bpfel.o`, comma-separated)
// run in alternating batches (benchPaired) on BenchmarkNetfilter's
// packets, and each object's time and net time are reported
// (kernel0-ns/op and net0-ns/op for the first, and so on). Run one after
// the other, two builds can land in different host states; alternated, a
// difference of 1 ns shows. The objects must be loadable by this
// package's Go code: the same maps and globals.
func BenchmarkNetfilterObjects(b *testing.B) {
	testutil.RequireRoot(b)
	list := os.Getenv("KZN_BENCH_OBJECTS")
	if list == "" {
		b.Skip("KZN_BENCH_OBJECTS is not set: nothing to compare")
	}
	objects := strings.Split(list, ",")
	for _, c := range netfilterCases(b) {
		b.Run(c.name, func(b *testing.B) {
			progs := make([]benchProg, len(objects))
			for i, obj := range objects {
				progs[i] = benchProg{loadWith(b, func(cfg Config) (*Datapath, error) { return loadObjectFile(cfg, obj) }, Config{}, c.prefix).objs.KznNetfilter, c.pkt}
			}
			benchPaired(b, c.pkt, progs...)
		})
	}
}

// BenchmarkNetfilterReference puts this host next to the datapath issue's
// reference machine, on which a program shaped like the original
// kubezonnet agent's took 92 ns an existing flow and an empty program 26.
// It alternates the empty program, kubezonnet's program (kernel0, net0)
// and that shape (kernel1, net1; package reference) so that the three see
// the same host state: the ratio of the two programs holds across states
// better than either figure. Both count BenchmarkNetfilter's packet of an
// existing flow: IPv4 for the reference (it counts nothing else), IPv4
// and IPv6 for kubezonnet, and the empty program runs on the IPv4 one.
// It checks afterwards that both programs counted every run, so that
// neither took another path.
func BenchmarkNetfilterReference(b *testing.B) {
	testutil.RequireRoot(b)
	v4 := netfilterCases(b)[0]
	src, dst := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.1.0.2")
	for _, c := range netfilterCases(b)[:2] {
		b.Run(c.name, func(b *testing.B) {
			d := loadLocal(b, Config{}, c.prefix)
			ref, err := reference.Load(netip.MustParsePrefix("10.0.0.0/8"))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { ref.Close() })
			retries := testRunRetries.Load()
			benchPaired(b, v4.pkt, benchProg{d.objs.KznNetfilter, c.pkt}, benchProg{ref.Netfilter(), v4.pkt})
			if n := testRunRetries.Load() - retries; n > 0 {
				b.Logf("%d runs interrupted by a signal and retried: the counts cannot be checked", n)
				return
			}

			// Each program ran b.N times, plus once to insert the flow.
			runs := uint64(b.N) + 1
			n, ok, err := ref.Bytes(src, dst)
			if err != nil || !ok || n != runs*uint64(len(v4.pkt)) {
				b.Fatalf("reference counted %d bytes (present %v, err %v), want %d runs of %d", n, ok, err, runs, len(v4.pkt))
			}
			if got := total(drain(b, d).Flows).Packets; got != runs {
				b.Fatalf("kubezonnet counted %d packets, want %d", got, runs)
			}
		})
	}
}

// BenchmarkNetfilterNewFlow measures runs that count a new flow, in the
// kernel's repeat loop like BenchmarkNetfilter: the program is loaded with
// its benchmark switch on (bench_new_flows, compiled out of the production
// program), which folds a run counter into the destination so that every
// run is a flow not seen before. A generation is drained (untimed) every
// `perGen` timed runs, followed by 64 untimed runs that bring back into the
// CPU caches what the drain evicted.
//
//   - new-flow: 2,048 new flows per generation into the table at its
//     start size, 4,096 slots per CPU (room for 2,048 flows), the common
//     case;
//   - new-flow-full-table: the same, with a memory bound that allows
//     2,048 slots per CPU: three flows in four are records of the flow
//     log;
//   - burst-16k: 16,384 new flows per generation (32,000 new flows per
//     second on 2 CPUs at a 1 s flush): the table takes 2,048, the log
//     the rest;
//   - burst-16k-ring-16k: the same, with a memory bound that gives the
//     log's ring 16,384 records per CPU instead of 262,144.
//
// Each starts with an untimed generation, so that the table has sized
// itself for the flows. The empty program is the baseline, as for
// BenchmarkNetfilter.
func BenchmarkNetfilterNewFlow(b *testing.B) {
	testutil.RequireRoot(b)
	v4 := packet.IPv4(b, 6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.0.2:443"), 1440, 0)
	b.Run("empty", func(b *testing.B) { benchRun(b, emptyNetfilter(b), v4) })
	b.Run("new-flow", func(b *testing.B) { benchNewFlows(b, v4, 0, 2048-64) })
	b.Run("new-flow-full-table", func(b *testing.B) { benchNewFlows(b, v4, tableMemoryFor(b, 2048), 4096-64) })
	b.Run("burst-16k", func(b *testing.B) { benchNewFlows(b, v4, 0, 16384-64) })
	b.Run("burst-16k-ring-16k", func(b *testing.B) { benchNewFlows(b, v4, tableMemoryFor(b, 8192), 16384-64) })
}

// benchNewFlows runs BenchmarkNetfilterNewFlow with a flow table of at
// most memory bytes (0: the default).
func benchNewFlows(b *testing.B, pkt []byte, memory uint64, perGen int) {
	const warm = 64
	d := loadWith(b, loadBenchNewFlows, Config{TableMemory: memory, MaxFlows: 65536}, "10.0.0.0/24")
	var dr Drained
	var total time.Duration
	var flows int
	testutil.OnCPU(b, 0, func() {
		progTestRun(b, d.objs.KznNetfilter, pkt, uint32(warm+perGen))
		if err := d.Drain(&dr); err != nil {
			b.Fatal(err)
		}
	})
	b.ResetTimer()
	testutil.OnCPU(b, 0, func() {
		for left := b.N; left > 0; {
			// Untimed: re-warm what the drain's syscalls and RCU
			// sleep evicted (a node drains every 10 s, not every few
			// thousand packets); these are new flows too.
			progTestRun(b, d.objs.KznNetfilter, pkt, warm)
			n := min(left, perGen)
			total += progTestRun(b, d.objs.KznNetfilter, pkt, uint32(n)) * time.Duration(n)
			left -= n
			b.StopTimer()
			if err := d.Drain(&dr); err != nil {
				b.Fatal(err)
			}
			flows += len(dr.Flows)
			for r, c := range dr.Uncounted {
				if !c.IsZero() && Reason(r) != ReasonNotLocal {
					b.Fatalf("%s during the benchmark: %+v", Reason(r), c)
				}
			}
			b.StartTimer()
		}
	})
	if flows < b.N {
		b.Fatalf("%d flows drained after %d runs: not every run was a new flow", flows, b.N)
	}
	b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "kernel-ns/op")
}

// BenchmarkDrain measures draining a generation of 100,000 flows, spread
// over the CPUs as a node's senders spread them: an untimed first round
// makes the table size itself (at its cap, 4,096 slots per CPU, with room
// for 2,048 flows); the flows beyond are records of the flow log, which
// the agent's reader adds up partly while the flows are sent (untimed)
// and the drain reads to the end.
func BenchmarkDrain(b *testing.B) {
	testutil.RequireRoot(b)
	const flows = 100_000
	d := loadLocal(b, Config{MaxFlows: 131072}, "10.0.0.0/24")
	pkts := make([][]byte, flows)
	for i := range pkts {
		dst := netip.AddrFrom4([4]byte{10, byte(1 + i>>16), byte(i >> 8), byte(i)})
		pkts[i] = packet.IPv4(b, 6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.AddrPortFrom(dst, 443), 100, 0)
	}
	fill := func() {
		for cpu := range d.nCPU {
			testutil.OnCPU(b, cpu, func() {
				for i := cpu; i < len(pkts); i += d.nCPU {
					runNF(b, d, pkts[i])
				}
			})
		}
	}
	var dr Drained
	fill()
	if err := d.Drain(&dr); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(dr.TableSlots), "slots/cpu")
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		fill()
		b.StartTimer()
		if err := d.Drain(&dr); err != nil {
			b.Fatal(err)
		}
		if len(dr.Flows) != flows {
			b.Fatalf("drained %d flows, want %d", len(dr.Flows), flows)
		}
	}
}

// BenchmarkMerge merges the flows of two CPU regions of 50,000 distinct
// flows each, as a drain of 100,000 flows spread over two CPUs does:
// index is the drain's merger, map the same merge with a Go map from key
// to record, the baseline that tells what the merger saves a drain.
func BenchmarkMerge(b *testing.B) {
	const n = 100_000
	keys := make([]flowFlowKey, n)
	for i := range keys {
		keys[i].Saddr = [16]uint8{10: 0xff, 11: 0xff, 12: 10, 15: 1}
		keys[i].Daddr = [16]uint8{10: 0xff, 11: 0xff, 12: 10, 13: byte(1 + i>>16), 14: byte(i >> 8), 15: byte(i)}
		keys[i].Port, keys[i].Proto, keys[i].Flags = 443, 6, uint8(flowFlowFlagFLOW_F_PORT_DST)
	}
	c := flow.Counts{Bytes: 100, Packets: 1}
	var flows []flow.Record
	b.Run("index", func(b *testing.B) {
		var m merger
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			m.reset()
			flows = flows[:0]
			for j := 0; j < n; j += 2 {
				flows = m.add(flows, &keys[j], c)
			}
			m.startIndex(flows)
			for j := 1; j < n; j += 2 {
				flows = m.add(flows, &keys[j], c)
			}
		}
	})
	b.Run("map", func(b *testing.B) {
		index := map[flowFlowKey]int32{}
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			clear(index)
			flows = flows[:0]
			for j := 0; j < n; j += 2 {
				index[keys[j]] = int32(len(flows))
				flows = append(flows, flow.Record{Key: convertKey(&keys[j]), Counts: c})
			}
			for j := 1; j < n; j += 2 {
				if r, ok := index[keys[j]]; ok {
					flows[r].Counts.Add(c)
					continue
				}
				index[keys[j]] = int32(len(flows))
				flows = append(flows, flow.Record{Key: convertKey(&keys[j]), Counts: c})
			}
		}
	})
}
