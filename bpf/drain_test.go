//go:build linux

package bpf

import (
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"time"

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
