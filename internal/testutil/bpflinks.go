package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// NetfilterLinks returns the ids of the netfilter BPF links a process
// holds, read from its file descriptors' fdinfo (bpftool of this Debian
// release neither names the netfilter link type nor shows owners).
func NetfilterLinks(t testing.TB, pid int) []int {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fdinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	var ids []int
	for _, fd := range fds {
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		if err != nil || !strings.Contains(string(info), "link_type:\tnetfilter") {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			var id int
			if _, err := fmt.Sscanf(line, "link_id:\t%d", &id); err == nil {
				ids = append(ids, id)
			}
		}
	}
	return ids
}

// LinkExists asks the kernel whether a BPF link id is still allocated.
func LinkExists(id int) bool {
	return exec.Command("bpftool", "link", "show", "id", fmt.Sprint(id)).Run() == nil
}
