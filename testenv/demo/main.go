// Command demo runs kubezonnet's datapath on a simulated three-zone cluster
// built from network namespaces on this host: one eBPF datapath per node,
// real TCP and UDP traffic between pods, and the per-flow counts each node
// drained from the kernel, printed as a table with the zone of each side.
// It needs root (network namespaces, BPF) and removes everything it made,
// also on Ctrl-C.
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) {
	fmt.Printf("==> "+format+"\n", args...)
}

func run() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (network namespaces and eBPF): run it with sudo")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	step("building a 3-zone cluster of network namespaces (nodes and pods, dual-stack)")
	topo, err := testnet.Build(ctx, testnet.Spec{Nodes: []testnet.NodeSpec{
		{Name: "node-a", Zone: "zone-a", Pods: []string{"api-1", "web-1"}},
		{Name: "node-b", Zone: "zone-b", Pods: []string{"db-0", "api-2"}},
		{Name: "node-c", Zone: "zone-c", Pods: []string{"cache-0"}},
	}})
	if err != nil {
		return err
	}
	defer func() {
		step("removing the namespaces")
		topo.Close()
	}()

	step("loading one eBPF datapath per node (netfilter POSTROUTING, IPv4 and IPv6)")
	dps := map[*testnet.Node]*bpf.Datapath{}
	for _, n := range topo.Nodes {
		dp, err := bpf.Load(bpf.Config{})
		if err != nil {
			return err
		}
		defer dp.Close()
		if err := dp.SetLocalPrefixes(n.LocalPrefixes()); err != nil {
			return err
		}
		if err := dp.AttachNetfilter(n.NSPath(), bpf.DefaultNetfilterPriority); err != nil {
			return err
		}
		dps[n] = dp
	}

	p := topo.Pod
	traffic := []struct {
		what     string
		from, to *testnet.Pod
		port     uint16
		bytes    int
		v6       bool
	}{
		{"api-1 (zone-a) pulls rows from db-0 (zone-b)", p("db-0"), p("api-1"), 0, 8 << 20, false},
		{"api-1 (zone-a) queries db-0 (zone-b)", p("api-1"), p("db-0"), 5432, 256 << 10, false},
		{"web-1 (zone-a) calls api-1 (zone-a, same node)", p("web-1"), p("api-1"), 8080, 1 << 20, false},
		{"api-2 (zone-b) reads cache-0 (zone-c) over IPv6", p("api-2"), p("cache-0"), 6379, 2 << 20, true},
		{"api-2 (zone-b) writes db-0 (zone-b)", p("api-2"), p("db-0"), 5432, 512 << 10, false},
	}
	for _, tr := range traffic {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		step("traffic: %s, %d KiB", tr.what, tr.bytes>>10)
		if tr.port == 0 { // the server side sends: a reply stream
			if err := transfer(ctx, tr.to, tr.from, 5432, tr.bytes, tr.v6, true); err != nil {
				return err
			}
			continue
		}
		if err := transfer(ctx, tr.from, tr.to, tr.port, tr.bytes, tr.v6, false); err != nil {
			return err
		}
	}
	time.Sleep(300 * time.Millisecond)

	step("draining every node's kernel counts")
	zoneOf := map[netip.Addr]string{}
	nameOf := map[netip.Addr]string{}
	for _, n := range topo.Nodes {
		zoneOf[n.IPv4], zoneOf[n.IPv6] = n.Zone, n.Zone
		nameOf[n.IPv4], nameOf[n.IPv6] = n.Name, n.Name
		for _, pod := range n.Pods {
			zoneOf[pod.IPv4], zoneOf[pod.IPv6] = n.Zone, n.Zone
			nameOf[pod.IPv4], nameOf[pod.IPv6] = pod.Name, pod.Name
		}
	}
	var rows []flow.Record
	var crossZone flow.Counts
	for _, n := range topo.Nodes {
		var dr bpf.Drained
		if err := dps[n].Drain(&dr); err != nil {
			return err
		}
		rows = append(rows, dr.Flows...)
		for i, c := range dr.Uncounted {
			if bpf.Reason(i) != bpf.ReasonNotLocal && !c.IsZero() {
				fmt.Printf("    %s: %d bytes not counted (%s)\n", n.Name, c.Bytes, bpf.Reason(i))
			}
		}
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].Bytes > rows[j].Bytes })
	w := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "SOURCE\tSRC ZONE\tDESTINATION\tDST ZONE\tPROTO\tSERVICE PORT\tBYTES\tPACKETS\tCROSS-ZONE\t")
	for _, r := range rows {
		name := func(a netip.Addr) string {
			if n, ok := nameOf[a]; ok {
				return n + " " + a.String()
			}
			return a.String()
		}
		port := "-"
		if r.Port != 0 {
			port = fmt.Sprintf("%d", r.Port)
			if r.PortIsDst {
				port = "→" + port
			} else {
				port = "←" + port
			}
		}
		cross := ""
		if zoneOf[r.Src] != "" && zoneOf[r.Dst] != "" && zoneOf[r.Src] != zoneOf[r.Dst] {
			cross = "yes"
			crossZone.Add(r.Counts)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t\n", name(r.Src), zoneOf[r.Src], name(r.Dst), zoneOf[r.Dst], flow.ProtoName(r.Proto), port, r.Bytes, r.Packets, cross)
	}
	w.Flush()
	fmt.Printf("\ncross-zone: %d bytes in %d packets (L3 bytes, every segment's headers counted)\n", crossZone.Bytes, crossZone.Packets)
	fmt.Println("service port: →N the packets went to port N (client to service), ←N they came from it (replies)")
	return nil
}

// transfer sends n bytes over TCP from one pod to another. With reverse,
// the listener side sends (a server streaming a response).
func transfer(ctx context.Context, from, to *testnet.Pod, port uint16, n int, v6, reverse bool) error {
	dst, network := to.IPv4, "tcp4"
	if v6 {
		dst, network = to.IPv6, "tcp6"
	}
	addr := netip.AddrPortFrom(dst, port).String()
	l, err := testnet.Listen(to.NS, network, addr)
	if err != nil {
		return err
	}
	defer l.Close()
	errc := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			errc <- err
			return
		}
		defer c.Close()
		if reverse {
			_, err = c.Write(make([]byte, n))
		} else {
			_, err = io.Copy(io.Discard, c)
		}
		errc <- err
	}()
	c, err := testnet.Dial(ctx, from.NS, network, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if reverse {
		if _, err := io.Copy(io.Discard, c); err != nil {
			return err
		}
	} else {
		if _, err := c.Write(make([]byte, n)); err != nil {
			return err
		}
		c.(*net.TCPConn).CloseWrite()
	}
	return <-errc
}
