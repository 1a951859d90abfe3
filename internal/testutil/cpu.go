package testutil

import (
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// OnCPU runs fn on the given CPU: the goroutine's thread is pinned there
// for the call, and its former affinity restored after. Kernel code run
// from fn (BPF_PROG_TEST_RUN) runs on that CPU, which is how tests place
// flows in a chosen CPU's per-CPU state.
func OnCPU(t testing.TB, cpu int, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var old, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		t.Fatalf("reading CPU affinity: %v", err)
	}
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		t.Fatalf("pinning to CPU %d: %v", cpu, err)
	}
	defer func() {
		if err := unix.SchedSetaffinity(0, &old); err != nil {
			t.Errorf("restoring CPU affinity: %v", err)
		}
	}()
	fn()
}
