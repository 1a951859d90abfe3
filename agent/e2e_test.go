//go:build linux

package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// kubezonnetBinary builds the real binary once per test run.
func kubezonnetBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "kzn-agent-test")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "kubezonnet")
		out, err := exec.Command("go", "build", "-o", binPath, "..").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %w: %s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func twoNodeTopology(t *testing.T) *testnet.Topology {
	t.Helper()
	topo, err := testnet.Build(context.Background(), testnet.Spec{Nodes: []testnet.NodeSpec{
		{Name: "a", Pods: []string{"a1", "a2"}},
		{Name: "b", Pods: []string{"b1"}},
	}})
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

// pairCounters installs one nftables counter per (source, destination)
// pair at the agent's hook and priority: the independent reference.
type pairCounters struct {
	ns    string
	pairs []pair
}

func installPairCounters(t *testing.T, ns string, pairs []pair) *pairCounters {
	t.Helper()
	var rules strings.Builder
	for i, p := range pairs {
		fam := "ip"
		if p.src.Is6() {
			fam = "ip6"
		}
		fmt.Fprintf(&rules, "    %s saddr %s %s daddr %s counter comment \"p%d\"\n", fam, p.src, fam, p.dst, i)
	}
	ruleset := fmt.Sprintf("table inet kzn_pairs {\n  chain post {\n    type filter hook postrouting priority %d; policy accept;\n%s  }\n}\n", bpf.DefaultNetfilterPriority, rules.String())
	if _, err := testnet.Exec(context.Background(), ns, "sh", "-c", "nft -f - <<'EOF'\n"+ruleset+"EOF\n"); err != nil {
		t.Fatal(err)
	}
	return &pairCounters{ns: ns, pairs: pairs}
}

func (pc *pairCounters) read(t *testing.T) map[pair]flow.Counts {
	t.Helper()
	out, err := testnet.Exec(context.Background(), pc.ns, "nft", "-j", "list", "table", "inet", "kzn_pairs")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Nftables []struct {
			Rule *struct {
				Comment string                       `json:"comment"`
				Expr    []map[string]json.RawMessage `json:"expr"`
			} `json:"rule"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatal(err)
	}
	res := map[pair]flow.Counts{}
	for _, o := range doc.Nftables {
		if o.Rule == nil {
			continue
		}
		var idx int
		if _, err := fmt.Sscanf(o.Rule.Comment, "p%d", &idx); err != nil {
			continue
		}
		for _, e := range o.Rule.Expr {
			if raw, ok := e["counter"]; ok {
				var c struct{ Packets, Bytes uint64 }
				if err := json.Unmarshal(raw, &c); err != nil {
					t.Fatal(err)
				}
				res[pc.pairs[idx]] = flow.Counts{Bytes: c.Bytes, Packets: c.Packets}
			}
		}
	}
	return res
}

// tcpTransfer sends n bytes from one namespace to a listener in another
// and waits until both sides closed.
func tcpTransfer(t *testing.T, fromNS, toNS string, dst netip.AddrPort, n int) {
	t.Helper()
	network := "tcp4"
	if dst.Addr().Is6() {
		network = "tcp6"
	}
	l, err := testnet.Listen(toNS, network, dst.String())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- -1
			return
		}
		k, _ := io.Copy(io.Discard, c)
		c.Close()
		got <- k
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := testnet.Dial(ctx, fromNS, network, dst.String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	if k := <-got; k != int64(n) {
		t.Fatalf("receiver got %d bytes, want %d", k, n)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	io.Copy(io.Discard, c)
	c.Close()
}

// TestAgentEndToEnd: the agent attached in a node namespace, real traffic
// between pods over several flush intervals, a receiver decoding the
// remote-write requests: bytes and packets per (source, destination)
// equal an nftables counter per pair at the same hook.
func TestAgentEndToEnd(t *testing.T) {
	testutil.RequireRoot(t)
	topo := twoNodeTopology(t)
	a, a1, a2, b1 := topo.Node("a"), topo.Pod("a1"), topo.Pod("a2"), topo.Pod("b1")
	pairs := []pair{
		{a1.IPv4, b1.IPv4}, {a2.IPv6, b1.IPv6}, {a1.IPv4, a2.IPv4}, {a.IPv4, b1.IPv4},
	}
	rcv := newReceiver(t, nil)
	cfg := testConfig(rcv.srv.URL)
	cfg.LocalPrefixes = a.LocalPrefixes()
	ra := startAgent(t, cfg)
	// The BPF hook first: the kernel refuses a BPF netfilter hook at a
	// priority another hook already uses (EBUSY), not the reverse.
	if err := ra.dp.AttachNetfilter(a.NSPath(), int32(cfg.NetfilterPriority)); err != nil {
		t.Fatal(err)
	}
	ref := installPairCounters(t, a.NS, pairs)
	for round := range 3 {
		tcpTransfer(t, a1.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 5432), 300_000+round)
		tcpTransfer(t, a2.NS, b1.NS, netip.AddrPortFrom(b1.IPv6, 443), 200_000)
		tcpTransfer(t, a1.NS, a2.NS, netip.AddrPortFrom(a2.IPv4, 8080), 50_000)
		tcpTransfer(t, a.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 9100), 10_000)
		time.Sleep(150 * time.Millisecond) // at least one flush between rounds
	}
	time.Sleep(300 * time.Millisecond)
	want := ref.read(t)
	if err := ra.stop(); err != nil {
		t.Fatal(err)
	}
	_, got, requests := rcv.snapshot()
	if requests < 4 {
		t.Errorf("only %d requests: the traffic did not span several flush intervals", requests)
	}
	for _, p := range pairs {
		if want[p].IsZero() {
			t.Fatalf("reference counter for %v -> %v is zero: no traffic seen", p.src, p.dst)
		}
		if got[p] != want[p] {
			t.Errorf("%v -> %v: received %+v, nftables counted %+v", p.src, p.dst, got[p], want[p])
		}
	}
}

// TestSIGTERMFinalDrain runs the real binary in a node namespace with a
// flush interval too long to ever fire: everything the receiver gets comes
// from the final drain on SIGTERM. The process exits 0 and its netfilter
// links are gone.
func TestSIGTERMFinalDrain(t *testing.T) {
	testutil.RequireRoot(t)
	bin := kubezonnetBinary(t)
	topo := twoNodeTopology(t)
	a, a1, b1 := topo.Node("a"), topo.Pod("a1"), topo.Pod("b1")
	p := pair{a1.IPv4, b1.IPv4}
	rcv := newReceiver(t, nil)
	var prefixes []string
	for _, pr := range a.LocalPrefixes() {
		prefixes = append(prefixes, pr.String())
	}
	cmd := exec.Command(bin, "agent",
		"--server-url", rcv.srv.URL, "--node-name", "a", "--netns-path", a.NSPath(),
		"--local-prefixes", strings.Join(prefixes, ","), "--flush-interval", "1h",
		"--listen-address", "", "--log-format", "json")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	logs := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			logs <- sc.Text()
		}
		close(logs)
	}()
	var all []string
	for line := range logs {
		all = append(all, line)
		if strings.Contains(line, "agent started") {
			break
		}
	}
	ref := installPairCounters(t, a.NS, []pair{p})
	links := testutil.NetfilterLinks(t, cmd.Process.Pid)
	if len(links) != 2 {
		t.Fatalf("agent holds %d netfilter links, want 2 (IPv4 and IPv6)", len(links))
	}
	tcpTransfer(t, a1.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 6379), 123_456)
	time.Sleep(200 * time.Millisecond)
	want := ref.read(t)[p]
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for line := range logs {
		all = append(all, line)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("agent exited with %v; logs:\n%s", err, strings.Join(all, "\n"))
	}
	_, got, requests := rcv.snapshot()
	if requests != 1 {
		t.Errorf("%d requests, want exactly the final one", requests)
	}
	if want.IsZero() || got[p] != want {
		t.Errorf("final batch carried %+v for %v -> %v, nftables counted %+v", got[p], p.src, p.dst, want)
	}
	for _, id := range links {
		if testutil.LinkExists(id) {
			t.Errorf("netfilter link %d still exists after the agent exited", id)
		}
	}
}
