//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kubezonnet/kubezonnet/internal/netns"
)

// AttachNetfilter attaches the netfilter program at POSTROUTING for IPv4 and
// IPv6 in the network namespace at nsPath ("" for the current one). Links
// are per namespace: a hook in the root namespace sees nothing of another.
func (d *Datapath) AttachNetfilter(nsPath string, priority int32) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("attaching netfilter: datapath closed")
	}
	return netns.Do(nsPath, func() error {
		for _, pf := range []link.NetfilterProtocolFamily{link.NetfilterProtoIPv4, link.NetfilterProtoIPv6} {
			l, err := link.AttachNetfilter(link.NetfilterOptions{
				Program:        d.objs.KznNetfilter,
				ProtocolFamily: pf,
				Hook:           link.NetfilterInetPostRouting,
				Priority:       priority,
			})
			if errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("attaching netfilter postrouting (family %d): priority %d is taken by another hook, which the kernel does not allow for BPF hooks: choose another priority below 100: %w", pf, priority, err)
			}
			if err != nil {
				return fmt.Errorf("attaching netfilter postrouting (family %d, priority %d): %w", pf, priority, err)
			}
			d.links = append(d.links, l)
		}
		return nil
	})
}

// CgroupV2Mount finds the mount point of the cgroup v2 hierarchy (for
// example /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts): the
// root to attach the cgroup_skb program to, so that every socket is seen.
func CgroupV2Mount() (string, error) {
	mounts, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "", fmt.Errorf("finding the cgroup v2 mount: %w", err)
	}
	for _, line := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[2] == "cgroup2" {
			return f[1], nil
		}
	}
	return "", errors.New("no cgroup v2 hierarchy mounted: set --cgroup-path or use --attach-mode=netfilter")
}

// AttachCgroup attaches the cgroup_skb egress program to the cgroup v2
// directory at path (normally the root of the hierarchy, so that every
// socket on the node is seen), and with it the programs that record the
// destination each socket asks for in connect() and sendmsg() (sock_dsts
// in flow.c), so that a flow whose destination a socket load balancer
// rewrote reports the address the application used as its original
// destination.
//
// Those programs must see the destination before a load balancer at the
// same hook rewrites it, and the kernel runs a hook's programs in a fixed
// order. For one socket, it runs the programs of the socket's own cgroup
// first, then those of its parent, up to the root (compute_effective_progs
// in kernel/bpf/cgroup.c; TestCgroupConnectHierarchy); within one cgroup,
// in the order of the cgroup's list, to which an attach appends unless it
// says otherwise. Kernels with
// the mprog interface for cgroup programs (Linux 6.17 and later,
// torvalds/linux 120933984460) accept BPF_F_BEFORE at BPF_LINK_CREATE,
// which without a relative program puts the program at the head of the
// list: ours run before any program attached to the same cgroup, earlier
// or later (TestCgroupConnectRecords checks both, and fails the earlier
// case without the flag). Older kernels refuse the flag; the programs are
// then appended and run before a load balancer only if attached before
// it, or if it sits in an ancestor of the cgroup at path. On either, a
// balancer in a descendant cgroup runs first, and so may one attached with
// BPF_F_PREORDER (which runs ahead of descendants' programs; not tested
// here): its rewrite is then not seen, and the flow has no original
// destination (our program records the backend, which the packets go
// to). The programs never refuse or change a connect() or sendmsg().
//
// A hook that holds a program attached without BPF_F_ALLOW_MULTI (Cilium
// before 1.14 attached its socket programs so) refuses ours: AttachCgroup
// then still attaches the rest and counts every flow, and returns an error
// that wraps ErrSocketHookTaken, which the caller may take as a warning.
func (d *Datapath) AttachCgroup(path string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("attaching cgroup: datapath closed")
	}
	// Counting first: the socket programs only add original destinations.
	l, err := link.AttachCgroup(link.CgroupOptions{
		Path:    path,
		Attach:  ebpf.AttachCGroupInetEgress,
		Program: d.objs.KznCgroupEgress,
	})
	if err != nil {
		return fmt.Errorf("attaching cgroup_skb egress to %s: %w", path, err)
	}
	d.links = append(d.links, l)
	cg, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("attaching to cgroup %s: %w", path, err)
	}
	defer cg.Close()
	var taken []error
	for _, p := range []struct {
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{d.objs.KznConnect4, ebpf.AttachCGroupInet4Connect},
		{d.objs.KznConnect6, ebpf.AttachCGroupInet6Connect},
		{d.objs.KznSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
		{d.objs.KznSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
	} {
		l, err := attachFirst(cg, path, p.prog, p.attach)
		if errors.Is(err, unix.EPERM) {
			taken = append(taken, fmt.Errorf("%w: %w", ErrSocketHookTaken, err))
			continue
		}
		if err != nil {
			return err
		}
		d.links = append(d.links, l)
	}
	return errors.Join(taken...)
}

// attachFirst attaches prog to the cgroup cg at the head of its hook's
// program list where the kernel can order cgroup programs, and appended to
// it where it cannot (see AttachCgroup).
func attachFirst(cg *os.File, path string, prog *ebpf.Program, attach ebpf.AttachType) (link.Link, error) {
	l, err := link.AttachRawLink(link.RawLinkOptions{
		Target:  int(cg.Fd()),
		Program: prog,
		Attach:  attach,
		Flags:   unix.BPF_F_BEFORE,
	})
	if err == nil {
		return l, nil
	}
	if !errors.Is(err, unix.EINVAL) {
		return nil, fmt.Errorf("attaching %s to %s: %w", attach, path, err)
	}
	// A kernel without ordering for cgroup programs refuses the flag.
	l2, err := link.AttachCgroup(link.CgroupOptions{Path: path, Attach: attach, Program: prog})
	if err != nil {
		return nil, fmt.Errorf("attaching %s to %s: %w", attach, path, err)
	}
	return l2, nil
}
