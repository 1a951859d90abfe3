package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/kubezonnet/kubezonnet/internal/netns"
)

// NetfilterLinks returns the ids of the netfilter BPF links a process
// holds (see ProcessNetfilterLinks).
func NetfilterLinks(t testing.TB, pid int) []int {
	t.Helper()
	ids, _, err := ProcessNetfilterLinks(pid)
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// ProcessNetfilterLinks returns the ids of the netfilter BPF links process
// pid holds and the program they run, read from its file descriptors'
// fdinfo (bpftool of this Debian release neither names the netfilter link
// type nor shows owners).
func ProcessNetfilterLinks(pid int) (ids []int, prog ebpf.ProgramID, err error) {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fdinfo", pid))
	if err != nil {
		return nil, 0, fmt.Errorf("reading the BPF links of process %d: %w", pid, err)
	}
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
			if _, err := fmt.Sscanf(line, "prog_id:\t%d", &id); err == nil {
				prog = ebpf.ProgramID(id)
			}
		}
	}
	return ids, prog, nil
}

// EmptyNetfilter loads the baseline of the datapath's measurements: a
// netfilter program that accepts every packet and does nothing else.
func EmptyNetfilter() (*ebpf.Program, error) {
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.Netfilter,
		AttachType:   ebpf.AttachNetfilter,
		License:      "MIT",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()}, // NF_ACCEPT
	})
	if err != nil {
		return nil, fmt.Errorf("loading the empty netfilter program: %w", err)
	}
	return p, nil
}

// AttachPostrouting attaches a netfilter program at POSTROUTING, IPv4 and
// IPv6, at priority in the namespace at nsPath, as the agent attaches its
// own, and returns the links (none when it fails).
func AttachPostrouting(nsPath string, prog *ebpf.Program, priority int32) ([]link.Link, error) {
	var links []link.Link
	err := netns.Do(nsPath, func() error {
		for _, pf := range []link.NetfilterProtocolFamily{link.NetfilterProtoIPv4, link.NetfilterProtoIPv6} {
			l, err := link.AttachNetfilter(link.NetfilterOptions{Program: prog, ProtocolFamily: pf, Hook: link.NetfilterInetPostRouting, Priority: priority})
			if err != nil {
				return err
			}
			links = append(links, l)
		}
		return nil
	})
	if err != nil {
		for _, l := range links {
			l.Close()
		}
		return nil, fmt.Errorf("attaching at POSTROUTING, priority %d, in %s: %w", priority, nsPath, err)
	}
	return links, nil
}

// LinkExists asks the kernel whether a BPF link id is still allocated.
func LinkExists(id int) bool {
	return exec.Command("bpftool", "link", "show", "id", fmt.Sprint(id)).Run() == nil
}
