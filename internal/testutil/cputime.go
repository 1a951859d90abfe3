package testutil

import (
	"syscall"
	"time"
)

// CPUTime is the user plus system CPU time of this process. Benchmarks
// report it per operation because on a shared machine wall time also
// counts other tenants' load.
func CPUTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
