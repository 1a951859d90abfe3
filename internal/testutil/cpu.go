package testutil

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
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

// PinProcess sets the CPUs of every thread of this process to cpus, a
// taskset list ("0", "0-2,5"); threads and programs started later inherit
// them. Benchmarks use it to keep their own work (and the programs they
// measure beside) off the CPUs whose time they measure.
func PinProcess(ctx context.Context, cpus string) error {
	out, err := exec.CommandContext(ctx, "taskset", "-a", "-p", "-c", cpus, strconv.Itoa(os.Getpid())).CombinedOutput()
	if err != nil {
		return fmt.Errorf("pinning this process to CPUs %s: taskset: %w: %s", cpus, err, bytes.TrimSpace(out))
	}
	return nil
}

// KeepProcessOff pins every thread of this process to the CPUs it may use
// but those of off, and returns those (a taskset list) and the function
// that gives the process all of its CPUs back. Work that pins its own
// thread to a CPU of off afterwards (OnCPU) then has that CPU to itself,
// as far as this process goes. When off leaves no CPU, or takes none,
// it changes nothing and returns no list; a CPU of off this process may
// not use is an error.
func KeepProcessOff(ctx context.Context, off *unix.CPUSet) (others string, restore func() error, err error) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return "", nil, fmt.Errorf("reading this process's CPUs: %w", err)
	}
	var all, rest []string
	for c := range 1024 {
		if off.IsSet(c) && !set.IsSet(c) {
			return "", nil, fmt.Errorf("CPU %d is not available to this process", c)
		}
		if set.IsSet(c) {
			all = append(all, strconv.Itoa(c))
			if !off.IsSet(c) {
				rest = append(rest, strconv.Itoa(c))
			}
		}
	}
	restore = func() error { return nil }
	if len(rest) == 0 || len(rest) == len(all) {
		return "", restore, nil
	}
	others = strings.Join(rest, ",")
	if err := PinProcess(ctx, others); err != nil {
		return "", nil, err
	}
	return others, func() error { return PinProcess(context.Background(), strings.Join(all, ",")) }, nil
}
