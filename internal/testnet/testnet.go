// Package testnet builds a small simulated cluster network on one Linux
// host out of network namespaces: a "fabric" namespace with a bridge joining
// node namespaces, and pod namespaces attached to their node by routed veth
// pairs (the Calico style: no bridge on the node, so netfilter sees
// same-node pod traffic without br_netfilter). Dual-stack throughout.
//
// Nothing is created in the host's namespace and no namespace gets a route
// to the host's uplink: every address in the topology lives in namespaces
// this package made, and Close removes them all.
//
// Addresses: node i (0-based) is 198.18.0.(i+1)/24 and fd00:198:18::(i+1)/64
// on the fabric (RFC 2544 benchmarking range); its pod CIDRs are
// 10.244.(i+1).0/24 and fd00:10:244:(i+1)::/64; pod j on it gets .(j+2).
package testnet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/netns"
)

// Spec describes the topology to build.
type Spec struct {
	// Nodes lists the nodes, each with the names of its pods.
	Nodes []NodeSpec
	// Offloads keeps TSO/GSO/GRO on. Off (the default) sets every veth to
	// one segment per skb, so that every counter in the path agrees
	// packet for packet.
	Offloads bool
	// StaticHosts are hosts outside the cluster (a managed database, an
	// on-prem range) on the fabric: host i is 198.18.0.(200+i) and
	// fd00:198:18::(200+i), with routes to every node's pods.
	StaticHosts []string
}

// Host is a machine outside the cluster, on the fabric.
type Host struct {
	Name       string
	NS         string
	IPv4, IPv6 netip.Addr
}

// NodeSpec is one node and its pods.
type NodeSpec struct {
	Name string
	Zone string
	Pods []string
}

// Topology is a built network. Close removes it.
type Topology struct {
	prefix string
	// offloads is Spec.Offloads, for pods plumbed again.
	offloads bool
	Fabric   string
	Nodes    []*Node
	Hosts    []*Host
}

// Node is a node namespace.
type Node struct {
	Name       string
	Zone       string
	NS         string
	Index      int
	IPv4, IPv6 netip.Addr
	PodCIDRs   []netip.Prefix
	Pods       []*Pod
}

// Pod is a pod namespace behind a veth pair on its node.
type Pod struct {
	Name       string
	NS         string
	Node       *Node
	IPv4, IPv6 netip.Addr
	// HostVeth is the node-side end of the pod's veth pair.
	HostVeth string
}

var seq atomic.Uint32

// Build creates the namespaces, links, addresses and routes of spec. On
// error, whatever was created is removed.
func Build(ctx context.Context, spec Spec) (_ *Topology, err error) {
	t := &Topology{prefix: fmt.Sprintf("kzn%d-%d", os.Getpid()%100000, seq.Add(1)), offloads: spec.Offloads}
	defer func() {
		if err != nil {
			err = errors.Join(err, t.Close())
		}
	}()
	t.Fabric = t.prefix + "-fabric"
	if err := addNS(ctx, t.Fabric); err != nil {
		return nil, err
	}
	if err := run(ctx, "ip", "-n", t.Fabric, "link", "add", "br0", "type", "bridge"); err != nil {
		return nil, err
	}
	if err := run(ctx, "ip", "-n", t.Fabric, "link", "set", "br0", "up"); err != nil {
		return nil, err
	}
	for i, ns := range spec.Nodes {
		n := &Node{
			Name: ns.Name, Zone: ns.Zone, Index: i, NS: t.prefix + "-" + ns.Name,
			IPv4: netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}),
			IPv6: netip.MustParseAddr(fmt.Sprintf("fd00:198:18::%x", i+1)),
			PodCIDRs: []netip.Prefix{
				netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i+1)),
				netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1)),
			},
		}
		t.Nodes = append(t.Nodes, n)
		if err := t.buildNode(ctx, n, spec); err != nil {
			return nil, err
		}
		for j, name := range ns.Pods {
			p := &Pod{
				Name: name, Node: n, NS: n.NS + "-" + name, HostVeth: fmt.Sprintf("p%d", j),
				IPv4: netip.AddrFrom4([4]byte{10, 244, byte(i + 1), byte(j + 2)}),
				IPv6: netip.MustParseAddr(fmt.Sprintf("fd00:10:244:%x::%x", i+1, j+2)),
			}
			n.Pods = append(n.Pods, p)
			if err := t.buildPod(ctx, p); err != nil {
				return nil, err
			}
		}
	}
	for i, name := range spec.StaticHosts {
		h := &Host{
			Name: name, NS: t.prefix + "-" + name,
			IPv4: netip.AddrFrom4([4]byte{198, 18, 0, byte(200 + i)}),
			IPv6: netip.MustParseAddr(fmt.Sprintf("fd00:198:18::%x", 200+i)),
		}
		t.Hosts = append(t.Hosts, h)
		if err := t.buildHost(ctx, h, i, spec); err != nil {
			return nil, err
		}
	}
	// Routes between nodes: each node's pod CIDRs via its fabric address.
	for _, n := range t.Nodes {
		for _, o := range t.Nodes {
			if o == n {
				continue
			}
			if err := run(ctx, "ip", "-n", n.NS, "route", "add", o.PodCIDRs[0].String(), "via", o.IPv4.String()); err != nil {
				return nil, err
			}
			if err := run(ctx, "ip", "-n", n.NS, "-6", "route", "add", o.PodCIDRs[1].String(), "via", o.IPv6.String()); err != nil {
				return nil, err
			}
		}
	}
	return t, nil
}

func (t *Topology) buildNode(ctx context.Context, n *Node, spec Spec) error {
	if err := addNS(ctx, n.NS); err != nil {
		return err
	}
	fab := fmt.Sprintf("n%d", n.Index)
	cmds := [][]string{
		{"ip", "-n", t.Fabric, "link", "add", fab, "type", "veth", "peer", "name", "fab0", "netns", n.NS},
		{"ip", "-n", t.Fabric, "link", "set", fab, "master", "br0", "up"},
		{"ip", "-n", n.NS, "link", "set", "lo", "up"},
		{"ip", "-n", n.NS, "addr", "add", n.IPv4.String() + "/24", "dev", "fab0"},
		{"ip", "-n", n.NS, "addr", "add", n.IPv6.String() + "/64", "dev", "fab0", "nodad"},
		{"ip", "-n", n.NS, "link", "set", "fab0", "up"},
		{"ip", "netns", "exec", n.NS, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
			"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"},
	}
	if err := runAll(ctx, cmds); err != nil {
		return err
	}
	if !spec.Offloads {
		if err := noOffloads(ctx, t.Fabric, fab); err != nil {
			return err
		}
		if err := noOffloads(ctx, n.NS, "fab0"); err != nil {
			return err
		}
	}
	return nil
}

func (t *Topology) buildHost(ctx context.Context, h *Host, i int, spec Spec) error {
	if err := addNS(ctx, h.NS); err != nil {
		return err
	}
	fab := fmt.Sprintf("h%d", i)
	cmds := [][]string{
		{"ip", "netns", "exec", h.NS, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"},
		{"ip", "-n", t.Fabric, "link", "add", fab, "type", "veth", "peer", "name", "fab0", "netns", h.NS},
		{"ip", "-n", t.Fabric, "link", "set", fab, "master", "br0", "up"},
		{"ip", "-n", h.NS, "link", "set", "lo", "up"},
		{"ip", "-n", h.NS, "addr", "add", h.IPv4.String() + "/24", "dev", "fab0"},
		{"ip", "-n", h.NS, "addr", "add", h.IPv6.String() + "/64", "dev", "fab0", "nodad"},
		{"ip", "-n", h.NS, "link", "set", "fab0", "up"},
	}
	for _, n := range t.Nodes {
		cmds = append(cmds,
			[]string{"ip", "-n", h.NS, "route", "add", n.PodCIDRs[0].String(), "via", n.IPv4.String()},
			[]string{"ip", "-n", h.NS, "-6", "route", "add", n.PodCIDRs[1].String(), "via", n.IPv6.String()})
	}
	if err := runAll(ctx, cmds); err != nil {
		return err
	}
	if !spec.Offloads {
		if err := noOffloads(ctx, t.Fabric, fab); err != nil {
			return err
		}
		return noOffloads(ctx, h.NS, "fab0")
	}
	return nil
}

func (t *Topology) buildPod(ctx context.Context, p *Pod) error {
	if err := addNS(ctx, p.NS); err != nil {
		return err
	}
	if err := run(ctx, "ip", "netns", "exec", p.NS, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"); err != nil {
		return err
	}
	return t.plumbPod(ctx, p)
}

// RecreatePod tears down the veth pair of pod p, which takes the node's
// routes to it along (as a CNI deletes a pod's sandbox), and plumbs a new
// one with the same addresses (as a sticky-IP CNI gives a replacement
// pod the addresses of the pod it replaces).
func (t *Topology) RecreatePod(ctx context.Context, p *Pod) error {
	if err := run(ctx, "ip", "-n", p.Node.NS, "link", "del", p.HostVeth); err != nil {
		return err
	}
	return t.plumbPod(ctx, p)
}

// plumbPod connects the namespace of pod p to its node: a veth pair, the
// pod's addresses and default routes, and the node's host routes to it.
func (t *Topology) plumbPod(ctx context.Context, p *Pod) error {
	n := p.Node
	cmds := [][]string{
		{"ip", "-n", n.NS, "link", "add", p.HostVeth, "type", "veth", "peer", "name", "eth0", "netns", p.NS},
		{"ip", "-n", n.NS, "addr", "add", "169.254.1.1/32", "dev", p.HostVeth},
		{"ip", "-n", n.NS, "addr", "add", "fe80::1/64", "dev", p.HostVeth, "nodad"},
		{"ip", "-n", n.NS, "link", "set", p.HostVeth, "up"},
		{"ip", "-n", p.NS, "link", "set", "lo", "up"},
		{"ip", "-n", p.NS, "addr", "add", p.IPv4.String() + "/32", "dev", "eth0"},
		{"ip", "-n", p.NS, "addr", "add", p.IPv6.String() + "/128", "dev", "eth0", "nodad"},
		{"ip", "-n", p.NS, "link", "set", "eth0", "up"},
		{"ip", "-n", p.NS, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"},
		{"ip", "-n", p.NS, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"},
		{"ip", "-n", p.NS, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"},
		{"ip", "-n", n.NS, "route", "add", p.IPv4.String() + "/32", "dev", p.HostVeth, "src", n.IPv4.String()},
		{"ip", "-n", n.NS, "-6", "route", "add", p.IPv6.String() + "/128", "dev", p.HostVeth, "src", n.IPv6.String()},
	}
	if err := runAll(ctx, cmds); err != nil {
		return err
	}
	if !t.offloads {
		if err := noOffloads(ctx, n.NS, p.HostVeth); err != nil {
			return err
		}
		if err := noOffloads(ctx, p.NS, "eth0"); err != nil {
			return err
		}
	}
	return nil
}

// noOffloads makes a veth hand the stack one wire segment per skb. ethtool
// alone is not enough on veth (TCP still builds multi-segment skbs), so the
// GSO segment limit is set to 1 as well.
func noOffloads(ctx context.Context, ns, dev string) error {
	return runAll(ctx, [][]string{
		{"ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"},
		{"ip", "-n", ns, "link", "set", "dev", dev, "gso_max_segs", "1"},
	})
}

// Close deletes every namespace of the topology (which removes the links
// and routes in them). It is safe to call more than once.
func (t *Topology) Close() error {
	var errs []error
	var names []string
	for _, n := range t.Nodes {
		for _, p := range n.Pods {
			names = append(names, p.NS)
		}
		names = append(names, n.NS)
	}
	for _, h := range t.Hosts {
		names = append(names, h.NS)
	}
	names = append(names, t.Fabric)
	for _, name := range names {
		if name == "" {
			continue
		}
		if _, err := os.Stat(netns.Path(name)); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := run(context.Background(), "ip", "netns", "del", name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Namespaces lists the names of every namespace of the topology.
func (t *Topology) Namespaces() []string {
	out := []string{t.Fabric}
	for _, n := range t.Nodes {
		out = append(out, n.NS)
		for _, p := range n.Pods {
			out = append(out, p.NS)
		}
	}
	for _, h := range t.Hosts {
		out = append(out, h.NS)
	}
	return out
}

// Pod returns the pod called name, or nil.
func (t *Topology) Pod(name string) *Pod {
	for _, n := range t.Nodes {
		for _, p := range n.Pods {
			if p.Name == name {
				return p
			}
		}
	}
	return nil
}

// Node returns the node called name, or nil.
func (t *Topology) Node(name string) *Node {
	for _, n := range t.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// LocalPrefixes are the sources a node's agent counts: its pod CIDRs and
// its own addresses (host-network traffic).
func (n *Node) LocalPrefixes() []netip.Prefix {
	return append([]netip.Prefix{
		netip.PrefixFrom(n.IPv4, 32), netip.PrefixFrom(n.IPv6, 128),
	}, n.PodCIDRs...)
}

// NSPath returns the path of the node's namespace.
func (n *Node) NSPath() string { return netns.Path(n.NS) }

// NSPath returns the path of the pod's namespace.
func (p *Pod) NSPath() string { return netns.Path(p.NS) }

// Listen opens a listener inside ns (the socket stays there).
func Listen(ns, network, addr string) (net.Listener, error) {
	var l net.Listener
	err := netns.Do(netns.Path(ns), func() (err error) {
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// ListenPacket opens a packet socket inside ns.
func ListenPacket(ns, network, addr string) (net.PacketConn, error) {
	var c net.PacketConn
	err := netns.Do(netns.Path(ns), func() (err error) {
		c, err = net.ListenPacket(network, addr)
		return err
	})
	return c, err
}

// Dial connects from inside ns.
func Dial(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := netns.Do(netns.Path(ns), func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Exec runs a command inside ns and returns its combined output.
func Exec(ctx context.Context, ns string, args ...string) ([]byte, error) {
	full := append([]string{"netns", "exec", ns}, args...)
	cmd := exec.CommandContext(ctx, "ip", full...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s in %s: %w: %s", strings.Join(args, " "), ns, err, bytes.TrimSpace(out))
	}
	return out, nil
}

func addNS(ctx context.Context, name string) error {
	return run(ctx, "ip", "netns", "add", name)
}

func runAll(ctx context.Context, cmds [][]string) error {
	for _, c := range cmds {
		if err := run(ctx, c[0], c[1:]...); err != nil {
			return err
		}
	}
	return nil
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// TB is the part of testing.TB that BuildT needs.
type TB interface {
	Helper()
	Fatal(args ...any)
	Errorf(format string, args ...any)
	Cleanup(func())
}

// BuildT builds spec for a test and removes it when the test ends, pass or
// fail; a failure to build fails the test.
func BuildT(t TB, spec Spec) *Topology {
	t.Helper()
	topo, err := Build(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := topo.Close(); err != nil {
			t.Errorf("removing topology: %v", err)
		}
	})
	return topo
}

// WaitNoLastACK waits until no TCP socket in ns is in LAST-ACK, or ctx
// ends. A transfer returns once the receiver has closed, before the
// sender's last ACK (of the receiver's FIN) has necessarily gone through
// the nodes' hooks; the receiver's socket stays in LAST-ACK until that ACK
// arrives, so none left means every packet of the connection has passed
// the hooks and been counted.
func WaitNoLastACK(ctx context.Context, ns string) error {
	for {
		out, err := Exec(ctx, ns, "ss", "-Htn", "state", "last-ack")
		if err != nil {
			return err
		}
		if len(bytes.TrimSpace(out)) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("sockets still in LAST-ACK in %s: %w\n%s", ns, ctx.Err(), out)
		case <-time.After(10 * time.Millisecond): // the poll interval
		}
	}
}
