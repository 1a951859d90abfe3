package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// Stop ends the program and everything it started: a shell whose child
// would otherwise survive it.
func TestProcessStopKillsGroup(t *testing.T) {
	marker := fmt.Sprintf("%d.%d", 3000+os.Getpid()%1000, time.Now().Nanosecond()%1000)
	p, err := StartProcess("sh", "/bin/sh", []string{"-c", "sleep " + marker + " & wait"}, ProcessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	// Wait until the child runs, so that the check below means something.
	deadline := time.Now().Add(10 * time.Second)
	for len(processesMentioning(t, "sleep\x00"+marker)) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the shell's child never appeared; output: %s", p.Output())
		}
		time.Sleep(20 * time.Millisecond) // the poll interval
	}
	if err := p.Stop(time.Second); err == nil {
		t.Error("a shell stopped by a signal reported a clean exit")
	}
	if got := processesMentioning(t, "sleep\x00"+marker); len(got) != 0 {
		t.Errorf("the shell's child survived Stop: %v", got)
	}
	if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(p.Pid()))); !os.IsNotExist(err) {
		t.Errorf("the shell is still in /proc (stat: %v)", err)
	}
	select {
	case <-p.Done():
	default:
		t.Error("Done is not closed after Stop")
	}
}
