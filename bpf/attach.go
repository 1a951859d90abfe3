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
// socket on the node is seen).
func (d *Datapath) AttachCgroup(path string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("attaching cgroup: datapath closed")
	}
	l, err := link.AttachCgroup(link.CgroupOptions{
		Path:    path,
		Attach:  ebpf.AttachCGroupInetEgress,
		Program: d.objs.KznCgroupEgress,
	})
	if err != nil {
		return fmt.Errorf("attaching cgroup_skb egress to %s: %w", path, err)
	}
	d.links = append(d.links, l)
	return nil
}
