//go:build linux

package agent

import (
	"context"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

var (
	buildOnce sync.Once
	binDir    string
	binPath   string
	buildErr  error
)

// TestMain removes the binary kubezonnetBinary built: it outlives every
// test, so no test's cleanup can.
func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// kubezonnetBinary builds the real binary once per test run.
func kubezonnetBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "kzn-agent-test")
		if buildErr != nil {
			return
		}
		binPath, buildErr = testutil.BuildKubezonnet(context.Background(), binDir)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func twoNodeTopology(t *testing.T) *testnet.Topology {
	t.Helper()
	return testnet.BuildT(t, testnet.Spec{Nodes: []testnet.NodeSpec{
		{Name: "a", Pods: []string{"a1", "a2"}},
		{Name: "b", Pods: []string{"b1"}},
	}})
}

// transfer is testnet.Transfer failing the test on error. It returns once
// every packet of the connection has gone through the nodes' hooks (see
// testnet.WaitNoLastACK).
func transfer(t *testing.T, fromNS, toNS string, dst netip.AddrPort, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := testnet.Transfer(ctx, fromNS, toNS, dst, n); err != nil {
		t.Fatal(err)
	}
	if err := testnet.WaitNoLastACK(ctx, toNS); err != nil {
		t.Fatal(err)
	}
}

// TestAgentEndToEnd: the agent attached in a node namespace, real traffic
// between pods over several flush intervals, a receiver decoding the
// remote-write requests: bytes and packets per (source, destination)
// equal an nftables counter per pair at the same hook.
func TestAgentEndToEnd(t *testing.T) {
	testutil.RequireRoot(t)
	topo := twoNodeTopology(t)
	a, a1, a2, b1 := topo.Node("a"), topo.Pod("a1"), topo.Pod("a2"), topo.Pod("b1")
	pairs := []testnet.Pair{
		{Src: a1.IPv4, Dst: b1.IPv4}, {Src: a2.IPv6, Dst: b1.IPv6}, {Src: a1.IPv4, Dst: a2.IPv4}, {Src: a.IPv4, Dst: b1.IPv4},
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
	ref := testnet.NewReference(bpf.DefaultNetfilterPriority)
	if err := ref.Watch(context.Background(), a.NS, pairs...); err != nil {
		t.Fatal(err)
	}
	for round := range 3 {
		_, _, before := rcv.snapshot()
		transfer(t, a1.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 5432), 300_000+round)
		transfer(t, a2.NS, b1.NS, netip.AddrPortFrom(b1.IPv6, 443), 200_000)
		transfer(t, a1.NS, a2.NS, netip.AddrPortFrom(a2.IPv4, 8080), 50_000)
		transfer(t, a.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 9100), 10_000)
		// At least one request per round, so the traffic spans several
		// flush intervals (the check on requests below); how the rounds
		// split between batches does not matter.
		waitFor(t, "a request after the round", func() bool {
			_, _, n := rcv.snapshot()
			return n > before
		})
	}
	// transfer waited for every packet to pass the hooks: the reference
	// is final, and the agent's final drain on stop holds the rest.
	want, err := ref.Read(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := ra.stop(); err != nil {
		t.Fatal(err)
	}
	_, got, requests := rcv.snapshot()
	if requests < 4 {
		t.Errorf("only %d requests: the traffic did not span several flush intervals", requests)
	}
	for _, p := range pairs {
		if want[p].IsZero() {
			t.Fatalf("reference counter for %v -> %v is zero: no traffic seen", p.Src, p.Dst)
		}
		if r := (pair{p.Src, p.Dst}); got[r] != want[p] {
			t.Errorf("%v -> %v: received %+v, nftables counted %+v", p.Src, p.Dst, got[r], want[p])
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
	p := testnet.Pair{Src: a1.IPv4, Dst: b1.IPv4}
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
	logs := &testutil.SyncBuffer{}
	exited := make(chan struct{}) // stderr closed: the agent is gone
	go func() {
		io.Copy(logs, stderr)
		close(exited)
	}()
	// The agent sets its prefixes, then attaches: its two netfilter links
	// existing is the event "counting from the next packet".
	var links []int
	deadline := time.Now().Add(20 * time.Second)
	for len(links) < 2 {
		select {
		case <-exited:
			t.Fatalf("agent exited before attaching; logs:\n%s", logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent holds %d netfilter links after 20s, want 2 (IPv4 and IPv6); logs:\n%s", len(links), logs.String())
		}
		time.Sleep(10 * time.Millisecond) // the poll interval
		links = testutil.NetfilterLinks(t, cmd.Process.Pid)
	}
	if len(links) != 2 {
		t.Fatalf("agent holds %d netfilter links, want 2 (IPv4 and IPv6)", len(links))
	}
	ref := testnet.NewReference(bpf.DefaultNetfilterPriority)
	if err := ref.Watch(context.Background(), a.NS, p); err != nil {
		t.Fatal(err)
	}
	transfer(t, a1.NS, b1.NS, netip.AddrPortFrom(b1.IPv4, 6379), 123_456)
	counts, err := ref.Read(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := counts[p]
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-exited // Wait must not run before the reads from stderr are done
	if err := cmd.Wait(); err != nil {
		t.Fatalf("agent exited with %v; logs:\n%s", err, logs.String())
	}
	_, got, requests := rcv.snapshot()
	if requests != 1 {
		t.Errorf("%d requests, want exactly the final one", requests)
	}
	if r := (pair{p.Src, p.Dst}); want.IsZero() || got[r] != want {
		t.Errorf("final batch carried %+v for %v -> %v, nftables counted %+v", got[r], p.Src, p.Dst, want)
	}
	for _, id := range links {
		if testutil.LinkExists(id) {
			t.Errorf("netfilter link %d still exists after the agent exited", id)
		}
	}
}
