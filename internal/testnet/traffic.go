package testnet

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
)

// Transfer sends n bytes over one TCP connection from the network
// namespace fromNS to a listener it opens at dst in toNS, and returns once
// both sides have closed. It is the traffic generator's unit of work: the
// payload is exactly n bytes; what the wire carries on top (headers, the
// receiver's ACKs) is measured by Reference counters.
func Transfer(ctx context.Context, fromNS, toNS string, dst netip.AddrPort, n int) error {
	return TransferChunked(ctx, fromNS, toNS, dst, n, n)
}

// TransferChunked is Transfer writing chunk bytes at a time. A chunk that
// is a multiple of the MSS (1448 over IPv4 and 1428 over IPv6 with TCP
// timestamps on a 1500-byte MTU) keeps every segment full, and paces the
// sender enough that bulk transfers through TSO do not overflow the veth
// queues (a drop means retransmitted segments: real bytes, but not the
// same bytes for two runs to compare).
func TransferChunked(ctx context.Context, fromNS, toNS string, dst netip.AddrPort, n, chunk int) error {
	return TransferVia(ctx, fromNS, toNS, dst, dst, n, chunk)
}

// TransferVia is TransferChunked with the client connecting to dial while
// the listener in toNS is at listen: a destination the network rewrites
// on the way (a Service's virtual IP, DNATed to a backend).
func TransferVia(ctx context.Context, fromNS, toNS string, dial, listen netip.AddrPort, n, chunk int) error {
	network := "tcp4"
	if dial.Addr().Is6() {
		network = "tcp6"
	}
	l, err := Listen(toNS, network, listen.String())
	if err != nil {
		return err
	}
	defer l.Close()
	got := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- err
			return
		}
		k, err := io.Copy(io.Discard, c)
		c.Close()
		if err == nil && k != int64(n) {
			err = fmt.Errorf("receiver got %d bytes, want %d", k, n)
		}
		got <- err
	}()
	c, err := Dial(ctx, fromNS, network, dial.String())
	if err != nil {
		return err
	}
	defer c.Close()
	// Writes that end mid-segment make TSO emit short segments, more
	// packets than the payload needs: Transfer writes once.
	buf := make([]byte, min(n, chunk))
	for left := n; left > 0; {
		k, err := c.Write(buf[:min(left, len(buf))])
		if err != nil {
			return err
		}
		left -= k
	}
	c.(*net.TCPConn).CloseWrite()
	if err := <-got; err != nil {
		return err
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.Copy(io.Discard, c)
	return nil
}

// Pair is a (source, destination) address pair.
type Pair struct{ Src, Dst netip.Addr }

// Reference counts, with nftables, the bytes and packets of chosen address
// pairs at a POSTROUTING priority, in the namespace of the node that sends
// them: the independent truth tests compare the datapath's counts with.
// Counters are added as pairs appear; each namespace has one table.
type Reference struct {
	priority int
	mu       sync.Mutex
	nodes    map[string][]Pair // node namespace -> pairs, rule i counts pairs[i]
}

// NewReference returns an empty reference counting at the given hook
// priority. The kernel refuses a BPF netfilter hook at a priority another
// hook already uses, so either attach BPF first or count one priority off.
func NewReference(priority int) *Reference {
	return &Reference{priority: priority, nodes: map[string][]Pair{}}
}

// Watch adds counters for pairs sent from the node namespace ns.
func (r *Reference) Watch(ctx context.Context, ns string, pairs ...Pair) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var script strings.Builder
	if _, ok := r.nodes[ns]; !ok {
		fmt.Fprintf(&script, "add table inet kzn_pairs\nadd chain inet kzn_pairs post { type filter hook postrouting priority %d; policy accept; }\n", r.priority)
	}
	for _, p := range pairs {
		fam := "ip"
		if p.Src.Is6() {
			fam = "ip6"
		}
		fmt.Fprintf(&script, "add rule inet kzn_pairs post %s saddr %s %s daddr %s counter comment \"p%d\"\n", fam, p.Src, fam, p.Dst, len(r.nodes[ns]))
		r.nodes[ns] = append(r.nodes[ns], p)
	}
	if _, err := Exec(ctx, ns, "sh", "-c", "nft -f - <<'EOF'\n"+script.String()+"EOF\n"); err != nil {
		return fmt.Errorf("installing reference counters: %w", err)
	}
	return nil
}

// Watched reports whether p is counted already.
func (r *Reference) Watched(p Pair) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, pairs := range r.nodes {
		for _, q := range pairs {
			if q == p {
				return true
			}
		}
	}
	return false
}

// Read returns the counts of every watched pair.
func (r *Reference) Read(ctx context.Context) (map[Pair]flow.Counts, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[Pair]flow.Counts{}
	for ns, pairs := range r.nodes {
		rules, err := nftCounters(ctx, ns, "kzn_pairs")
		if err != nil {
			return nil, err
		}
		for _, rule := range rules {
			var i int
			if _, err := fmt.Sscanf(rule.Comment, "p%d", &i); err != nil || i >= len(pairs) {
				continue
			}
			sum := out[pairs[i]]
			sum.Add(flow.Counts{Bytes: rule.Bytes, Packets: rule.Packets})
			out[pairs[i]] = sum
		}
	}
	return out, nil
}

// NetStat returns the namespace's SNMP counters of the given names, as
// nstat spells them ("TcpOutSegs", "TcpExtTCPOrigDataSent"): the kernel's
// own count of what its stack sent, which a test compares the datapath's
// with. Every name must be one the kernel knows.
func NetStat(ctx context.Context, ns string, names ...string) (map[string]uint64, error) {
	out, err := Exec(ctx, ns, append([]string{"nstat", "-asz"}, names...)...)
	if err != nil {
		return nil, err
	}
	// One line per counter asked for ("TcpOutSegs 7204 0.0") after a
	// "#kernel" header.
	got := map[string]uint64{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		n, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("parsing nstat output %q: %w", line, err)
		}
		got[f[0]] = n
	}
	for _, n := range names {
		if _, ok := got[n]; !ok {
			return nil, fmt.Errorf("nstat printed no %s: %s", n, out)
		}
	}
	return got, nil
}

// TCPSegmentsSent returns the TCP segments namespace ns has sent so far:
// TcpOutSegs, which counts new data and control segments, plus
// TcpRetransSegs (TcpOutSegs leaves retransmissions out). The kernel adds
// a GSO skb's segment count to both, so this is the sender's own count of
// wire segments, whatever TSO made of them.
func TCPSegmentsSent(ctx context.Context, ns string) (uint64, error) {
	v, err := NetStat(ctx, ns, "TcpOutSegs", "TcpRetransSegs")
	if err != nil {
		return 0, err
	}
	return v["TcpOutSegs"] + v["TcpRetransSegs"], nil
}

// TxDropped returns the packets device dev in ns dropped on transmit. A
// veth counts there what its peer's backlog refused: on a pod's eth0, skbs
// lost before they reached the node, which a sender's count of its
// segments includes and the node's hooks never see.
func TxDropped(ctx context.Context, ns, dev string) (uint64, error) {
	out, err := exec.CommandContext(ctx, "ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev).Output()
	if err != nil {
		return 0, fmt.Errorf("reading the statistics of %s in %s: %w", dev, ns, err)
	}
	var links []struct {
		Stats64 struct {
			TX struct {
				Dropped uint64 `json:"dropped"`
			} `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
		return 0, fmt.Errorf("parsing the statistics of %s in %s: %v: %s", dev, ns, err, out)
	}
	return links[0].Stats64.TX.Dropped, nil
}
