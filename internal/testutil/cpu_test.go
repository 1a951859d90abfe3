package testutil

import (
	"context"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestKeepProcessOff: the process leaves the CPUs it is kept off and gets
// them back; a CPU it may not use is refused.
func TestKeepProcessOff(t *testing.T) {
	var before unix.CPUSet
	if err := unix.SchedGetaffinity(0, &before); err != nil {
		t.Fatal(err)
	}
	if before.Count() < 2 {
		t.Skip("needs 2 CPUs: on one, KeepProcessOff changes nothing")
	}
	last := -1
	for c := range 1024 {
		if before.IsSet(c) {
			last = c
		}
	}
	var off unix.CPUSet
	off.Set(last)
	others, restore, err := KeepProcessOff(context.Background(), &off)
	if err != nil {
		t.Fatal(err)
	}
	runtime.LockOSThread() // read this thread's CPUs, the ones taskset set
	defer runtime.UnlockOSThread()
	var during unix.CPUSet
	if err := unix.SchedGetaffinity(0, &during); err != nil {
		t.Fatal(err)
	}
	if during.IsSet(last) || during.Count() != before.Count()-1 {
		t.Errorf("kept off CPU %d, the process has %d CPUs (CPU %d among them: %v), want the %d others (%s)",
			last, during.Count(), last, during.IsSet(last), before.Count()-1, others)
	}
	if err := restore(); err != nil {
		t.Fatal(err)
	}
	var after unix.CPUSet
	if err := unix.SchedGetaffinity(0, &after); err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Errorf("after restore the process has %d CPUs, want its %d", after.Count(), before.Count())
	}

	if before.IsSet(1023) {
		return // no CPU this process may not use
	}
	var unavailable unix.CPUSet
	unavailable.Set(1023)
	if _, _, err := KeepProcessOff(context.Background(), &unavailable); err == nil {
		t.Errorf("kept off CPU 1023, which this process may not use: want an error naming it")
	} else if want := strconv.Itoa(1023); !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not name CPU %s", err, want)
	}
}
