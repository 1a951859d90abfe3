package traffic

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/netns"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
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
		links, prog, err := netfilterLinks(p.Pid())
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

// netfilterLinks returns the ids of the netfilter BPF links process pid
// holds and the program they run, from its file descriptors' fdinfo.
func netfilterLinks(pid int) ([]int, ebpf.ProgramID, error) {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fdinfo", pid))
	if err != nil {
		return nil, 0, err
	}
	var links []int
	var prog ebpf.ProgramID
	for _, fd := range fds {
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		if err != nil || !strings.Contains(string(info), "link_type:\tnetfilter") {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			var id int
			if _, err := fmt.Sscanf(line, "link_id:\t%d", &id); err == nil {
				links = append(links, id)
			}
			if _, err := fmt.Sscanf(line, "prog_id:\t%d", &id); err == nil {
				prog = ebpf.ProgramID(id)
			}
		}
	}
	return links, prog, nil
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

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat:
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// cpuTime returns the user plus system CPU time of process pid.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("reading CPU time: %w", err)
	}
	// The command name (field 2) may hold spaces: count fields after the
	// closing parenthesis. utime and stime are fields 14 and 15.
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 13 {
		return 0, fmt.Errorf("reading CPU time: short /proc/%d/stat", pid)
	}
	var ticks int64
	for _, f := range fields[11:13] {
		v, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("reading CPU time: %w", err)
		}
		ticks += v
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}

// peakRSS returns VmHWM, the peak resident set of process pid, in bytes.
func peakRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("reading VmHWM: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("reading VmHWM: %w", err)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("reading VmHWM: not in /proc/%d/status", pid)
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

// emptyProgram loads the program of the Empty runs: a netfilter program
// that accepts every packet and does nothing else.
func emptyProgram() (*ebpf.Program, error) {
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

// attachEmpty attaches prog where the agent attaches its program: node's
// POSTROUTING, IPv4 and IPv6, at the agent's default priority.
func attachEmpty(node *testnet.Node, prog *ebpf.Program) ([]link.Link, error) {
	var links []link.Link
	err := netns.Do(node.NSPath(), func() error {
		for _, pf := range []link.NetfilterProtocolFamily{link.NetfilterProtoIPv4, link.NetfilterProtoIPv6} {
			l, err := link.AttachNetfilter(link.NetfilterOptions{
				Program: prog, ProtocolFamily: pf, Hook: link.NetfilterInetPostRouting,
				Priority: bpf.DefaultNetfilterPriority,
			})
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
		return nil, fmt.Errorf("attaching the empty program in %s: %w", node.NS, err)
	}
	return links, nil
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
