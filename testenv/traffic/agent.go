package traffic

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
	"github.com/kubezonnet/kubezonnet/internal/wire"
	"github.com/kubezonnet/kubezonnet/testenv"
)

// agentProc is the real agent attached in node a's namespace.
type agentProc struct {
	p *testenv.Process
	// prog is the id of the program the agent's netfilter links run.
	prog ebpf.ProgramID
}

// startAgent starts the agent for node n, pushing to url, and waits until
// both its netfilter links (IPv4 and IPv6) exist: from then on every
// packet through node a's POSTROUTING is counted.
func startAgent(ctx context.Context, opts Options, n *testnet.Node, url string, flush time.Duration) (*agentProc, error) {
	var prefixes []string
	for _, p := range n.LocalPrefixes() {
		prefixes = append(prefixes, p.String())
	}
	// --local-prefixes instead of auto: the agent needs no API server.
	args := append([]string{"agent",
		"--server-url", url, "--node-name", n.Name, "--netns-path", n.NSPath(),
		"--local-prefixes", strings.Join(prefixes, ","), "--flush-interval", flush.String(),
		"--listen-address", "", "--log-format", "json",
	}, opts.AgentFlags...)
	p, err := testenv.StartProcess("agent", opts.Bin, args, testenv.ProcessOptions{Output: opts.ProgramOutput})
	if err != nil {
		return nil, err
	}
	a := &agentProc{p: p}
	deadline := time.Now().Add(20 * time.Second)
	for {
		links, prog, err := testutil.ProcessNetfilterLinks(p.Pid())
		if err == nil && len(links) == 2 {
			a.prog = prog
			return a, nil
		}
		select {
		case <-p.Done():
			return nil, fmt.Errorf("agent exited before attaching: %v; output:\n%s", p.Err(), p.Output())
		case <-ctx.Done():
			p.Kill()
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond): // the poll interval
		}
		if time.Now().After(deadline) {
			p.Kill()
			return nil, fmt.Errorf("agent holds %d netfilter links after 20s, want 2; output:\n%s", len(links), p.Output())
		}
	}
}

// stop sends SIGTERM and waits for the final drain and send; the agent
// must exit cleanly.
func (a *agentProc) stop() error {
	if err := a.p.Stop(30 * time.Second); err != nil {
		return fmt.Errorf("agent exited with %v; output:\n%s", err, a.p.Output())
	}
	return nil
}

// progStats are a program's cumulative run count and run time, as
// kernel.bpf_stats_enabled keeps them.
type progStats struct {
	runs uint64
	time time.Duration
	// misses counts runs the kernel skipped because another BPF program
	// was running on the CPU: packets the program never saw.
	misses uint64
}

// readProgStats reads the statistics of program id.
func readProgStats(id ebpf.ProgramID) (progStats, error) {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return progStats{}, fmt.Errorf("opening program %d: %w", id, err)
	}
	defer p.Close()
	st, err := p.Stats()
	if err != nil {
		return progStats{}, fmt.Errorf("reading program %d's statistics: %w", id, err)
	}
	s := progStats{runs: st.RunCount, time: st.Runtime, misses: st.RecursionMisses}
	return s, nil
}

// receiver stands in for the server: it decodes the agent's remote-write
// requests with internal/wire and sums, per (source, destination) address
// pair, what the agent reported, applying each incarnation's batches once
// (highest seq) as the server does.
type receiver struct {
	URL string
	srv *http.Server

	mu      sync.Mutex
	lastSeq map[string]uint64
	pairs   map[testnet.Pair]flow.Counts
	batches int
	// maxFlows is the largest batch, in flows.
	maxFlows int
	// dropped sums the agent's kubezonnet_agent_dropped_* self-metrics
	// of its last batch (cumulative values).
	dropped flow.Counts
	err     error
}

func startReceiver() (*receiver, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &receiver{URL: "http://" + l.Addr().String()}
	r.reset()
	r.srv = &http.Server{Handler: http.HandlerFunc(r.handle), ReadHeaderTimeout: 10 * time.Second}
	go r.srv.Serve(l)
	return r, nil
}

// Close stops the receiver.
func (r *receiver) Close() error { return r.srv.Close() }

// reset forgets everything received.
func (r *receiver) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lastSeq = map[string]uint64{}
	r.pairs = map[testnet.Pair]flow.Counts{}
	r.batches, r.maxFlows, r.dropped, r.err = 0, 0, flow.Counts{}, nil
}

func (r *receiver) handle(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var d wire.Decoder
	var b wire.Batch
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := d.Decode(body, &b); err != nil {
		r.err = errors.Join(r.err, fmt.Errorf("undecodable request from the agent: %w", err))
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if b.Seq > r.lastSeq[b.Incarnation] {
		r.lastSeq[b.Incarnation] = b.Seq
		r.batches++
		r.maxFlows = max(r.maxFlows, len(b.Flows))
		for _, f := range b.Flows {
			p := testnet.Pair{Src: f.Src, Dst: f.Dst}
			c := r.pairs[p]
			c.Add(f.Counts)
			r.pairs[p] = c
		}
		var dropped flow.Counts
		for _, m := range b.Metrics {
			switch m.Name {
			case "kubezonnet_agent_dropped_bytes_total":
				dropped.Bytes += uint64(m.Value)
			case "kubezonnet_agent_dropped_packets_total":
				dropped.Packets += uint64(m.Value)
			}
		}
		r.dropped = dropped
	}
	w.WriteHeader(http.StatusNoContent)
}

// received is what the receiver holds.
type received struct {
	pairs             map[testnet.Pair]flow.Counts
	batches, maxFlows int
	dropped           flow.Counts
	err               error
}

func (r *receiver) snapshot() received {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := received{pairs: map[testnet.Pair]flow.Counts{}, batches: r.batches, maxFlows: r.maxFlows, dropped: r.dropped, err: r.err}
	for k, v := range r.pairs {
		out.pairs[k] = v
	}
	return out
}

// attachEmpty attaches prog where the agent attaches its program: node's
// POSTROUTING, IPv4 and IPv6, at the agent's default priority.
func attachEmpty(node *testnet.Node, prog *ebpf.Program) ([]link.Link, error) {
	return testutil.AttachPostrouting(node.NSPath(), prog, bpf.DefaultNetfilterPriority)
}

// programID returns the kernel's ID of prog.
func programID(prog *ebpf.Program) (ebpf.ProgramID, error) {
	info, err := prog.Info()
	if err != nil {
		return 0, fmt.Errorf("reading the program's info: %w", err)
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("the kernel gives no program ID")
	}
	return id, nil
}
