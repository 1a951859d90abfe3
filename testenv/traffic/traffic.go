package traffic

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// Kind is how a case makes its traffic.
type Kind int

// Kinds of traffic.
const (
	// TCP is one iperf3 stream, measured in Gbit/s.
	TCP Kind = iota
	// UDP is the package's datagram generator, measured in kpps.
	UDP
)

func (k Kind) String() string {
	if k == TCP {
		return "TCP"
	}
	return "UDP"
}

// Case is one row of the table: a kind of traffic and the agent's flush
// interval for it.
type Case struct {
	// Name identifies the case on the command line (-cases).
	Name string
	// Title is the row's label.
	Title string
	Kind  Kind
	// Offloads keeps TSO and GSO on every veth (their defaults) for TCP;
	// off sets them and GRO off with ethtool. UDP runs on testnet's
	// default topology: one segment per skb, offloads off.
	Offloads bool
	// Payload is the UDP payload in bytes.
	Payload int
	// Flows is the number of UDP flows sent to at a time (distinct
	// destination ports).
	Flows int
	// Rotate replaces the whole flow set every Rotate (0: never), so that
	// Flows/Rotate new flows appear per second.
	Rotate time.Duration
	// FlushInterval is the agent's --flush-interval.
	FlushInterval time.Duration
}

// Unit is the unit of the case's rate.
func (c Case) Unit() string {
	if c.Kind == TCP {
		return "Gbit/s"
	}
	return "kpps"
}

// Cases are the cases the benchmark knows, in table order.
var Cases = []Case{
	{Name: "tcp-offloads", Title: "TCP, offloads on", Kind: TCP, Offloads: true, FlushInterval: 10 * time.Second},
	{Name: "tcp-no-offloads", Title: "TCP, offloads off", Kind: TCP, FlushInterval: 10 * time.Second},
	{Name: "udp-1flow", Title: "UDP 64 B, one flow", Kind: UDP, Payload: 64, Flows: 1, FlushInterval: 10 * time.Second},
	{Name: "udp-2k-flows", Title: "UDP 64 B, 2,000 flows, 10 s flush", Kind: UDP, Payload: 64, Flows: 2000, FlushInterval: 10 * time.Second},
	{Name: "udp-32k-flows-per-s", Title: "UDP 64 B, 32,000 new flows/s, 1 s flush", Kind: UDP, Payload: 64, Flows: 32000, Rotate: time.Second, FlushInterval: time.Second},
}

// CaseByName returns the case called name.
func CaseByName(name string) (Case, bool) {
	for _, c := range Cases {
		if c.Name == name {
			return c, true
		}
	}
	return Case{}, false
}

// Options configure a run. Zero fields take the defaults of Defaults.
type Options struct {
	// Cases to run, by name; empty runs all of Cases.
	Cases []string
	// Runs is the number of rounds per case, each a run of every Mode in
	// turn: nothing attached, the empty program, the agent.
	Runs int
	// Duration of the traffic of one run.
	Duration time.Duration
	// Bin is the kubezonnet binary; empty builds this checkout into a
	// temporary directory.
	Bin string
	// AgentFlags are added to the agent's command line, after the
	// benchmark's own (so they may override them).
	AgentFlags []string
	// Conntrack makes node a track connections, as every node running
	// kube-proxy (iptables, nftables or IPVS mode) does: an nftables rule
	// matching on the connection state loads conntrack in its namespace,
	// so every packet there is looked up in (and each new flow added to)
	// the connection table before the agent's hook. Without it, node a
	// only routes: the kernel keeps no per-flow state of its own.
	Conntrack bool
	// NoBPFStats leaves kernel.bpf_stats_enabled alone: no program run
	// time or count is measured, and the program runs without the two
	// clock reads the statistics add to each run.
	NoBPFStats bool
	// Output receives progress lines; nil discards them.
	Output io.Writer
	// ProgramOutput receives the agent's and iperf3's output; nil keeps
	// their last lines only, for error messages.
	ProgramOutput io.Writer
}

// Defaults finish every case in about 12 minutes on a 2-core machine: 5
// cases x 4 rounds x 3 runs x 10 s of traffic, plus about a second of
// setup per run.
var Defaults = Options{Runs: 4, Duration: 10 * time.Second}

func (o *Options) setDefaults() {
	if o.Runs == 0 {
		o.Runs = Defaults.Runs
	}
	if o.Duration == 0 {
		o.Duration = Defaults.Duration
	}
	if len(o.Cases) == 0 {
		for _, c := range Cases {
			o.Cases = append(o.Cases, c.Name)
		}
	}
}

// Validate checks the options after defaults were applied.
func (o *Options) Validate() error {
	var errs []error
	if o.Runs < 1 {
		errs = append(errs, fmt.Errorf("runs %d: want at least 1", o.Runs))
	}
	if o.Duration < time.Second {
		errs = append(errs, fmt.Errorf("duration %s: want at least 1s (iperf3 runs whole seconds)", o.Duration))
	}
	for _, name := range o.Cases {
		if _, ok := CaseByName(name); !ok {
			var names []string
			for _, c := range Cases {
				names = append(names, c.Name)
			}
			errs = append(errs, fmt.Errorf("case %q: unknown (want one of %s)", name, strings.Join(names, ", ")))
		}
	}
	return errors.Join(errs...)
}

// referencePriority is the nftables reference counter's hook priority: one
// before the agent's, since the kernel refuses a BPF netfilter hook at a
// priority another hook already uses. Both are before source NAT (100),
// which this topology does not do anyway.
const referencePriority = bpf.DefaultNetfilterPriority - 1

// Run runs the selected cases and returns what they measured. An error
// means the benchmark could not run; counts that were not exact are in the
// result (Result.Exact, Result.Mismatches).
func Run(ctx context.Context, opts Options) (*Result, error) {
	opts.setDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	progress := opts.Output
	if progress == nil {
		progress = io.Discard
	}
	logf := func(format string, args ...any) {
		fmt.Fprintf(progress, "traffic: "+format+"\n", args...)
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root (network namespaces, BPF)")
	}
	dir, err := os.MkdirTemp("", "kzn-traffic")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if opts.Bin == "" {
		logf("building kubezonnet")
		if opts.Bin, err = testutil.BuildKubezonnet(ctx, dir); err != nil {
			return nil, err
		}
	}
	logf("building the UDP generator")
	udpgen, err := testutil.BuildCommand(ctx, dir, "udpgen", "./testenv/traffic/cmd/udpgen")
	if err != nil {
		return nil, err
	}
	if !opts.NoBPFStats {
		// Held while the file descriptor is open: the kernel times every
		// BPF program run (two clock reads each) until Close.
		stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
		if err != nil {
			return nil, fmt.Errorf("enabling kernel.bpf_stats_enabled: %w", err)
		}
		defer stats.Close()
	}
	rcv, err := startReceiver()
	if err != nil {
		return nil, err
	}
	defer rcv.Close()

	empty, err := testutil.EmptyNetfilter()
	if err != nil {
		return nil, err
	}
	defer empty.Close()
	b := &bench{opts: opts, logf: logf, rcv: rcv, topos: map[Kind]*world{}, empty: empty, udpgen: udpgen}
	defer b.close()
	res := &Result{Options: opts, Host: describeHost(), LoadStart: loadAverage()}
	for _, name := range opts.Cases {
		c, _ := CaseByName(name)
		w, err := b.world(ctx, c.Kind)
		if err != nil {
			return nil, err
		}
		if c.Kind == TCP {
			if err := w.setOffloads(ctx, c.Offloads); err != nil {
				return nil, err
			}
		}
		cr, err := b.runCase(ctx, w, c, res)
		if err != nil {
			return nil, err
		}
		res.Cases = append(res.Cases, cr)
	}
	res.LoadEnd = loadAverage()
	return res, nil
}

// runCase runs the rounds of case c in world w, adding what does not
// hold to res. During a UDP case this process, and the agent it starts,
// keep off the generator's CPU: the datagrams cross every namespace in
// that CPU's softirqs, and the benchmark's own work (the remote-write
// receiver, nft reads) and the agent's user space would otherwise take
// that CPU's time in some runs and not in others, and the rates would
// measure them. The generator is a process of its own (see Generator),
// so that this process's work does not wait for the generator's thread,
// nor the generator for this process's. The agent's user space is
// measured on its own (its CPU time); the rates measure what its program
// and hooks cost the traffic.
// TCP keeps every CPU: iperf3's client and server take what they need.
func (b *bench) runCase(ctx context.Context, w *world, c Case, res *Result) (CaseResult, error) {
	logf, opts := b.logf, b.opts
	if c.Kind == UDP {
		var gen unix.CPUSet
		gen.Set(generatorCPU())
		_, restore, err := testutil.KeepProcessOff(ctx, &gen)
		if err != nil {
			return CaseResult{}, err
		}
		defer func() {
			if err := restore(); err != nil {
				logf("giving this process its CPUs back: %v", err)
			}
		}()
	}
	cr := CaseResult{Case: c}
	for i := range opts.Runs {
		for _, mode := range RoundModes(i) {
			r, err := b.run(ctx, w, c, mode)
			if err != nil {
				return CaseResult{}, fmt.Errorf("%s, round %d, %s: %w", c.Name, i+1, mode, err)
			}
			logf("%s round %d %s: %s", c.Name, i+1, mode, r.summary(c))
			switch mode {
			case Empty:
				cr.Empty = append(cr.Empty, r)
			case Agent:
				cr.With = append(cr.With, r)
				if r.Unchecked != "" {
					res.Unchecked = append(res.Unchecked, fmt.Sprintf("%s round %d: %s", c.Name, i+1, r.Unchecked))
				}
				if r.Mismatch != "" {
					res.Mismatches = append(res.Mismatches, fmt.Sprintf("%s round %d: %s", c.Name, i+1, r.Mismatch))
					logf("NOT EXACT: %s round %d: %s", c.Name, i+1, r.Mismatch)
				}
			case None:
				cr.Without = append(cr.Without, r)
			}
		}
	}
	return cr, nil
}

// world is one built topology and its fixtures.
type world struct {
	topo           *testnet.Topology
	node           *testnet.Node // node a, the router namespace
	client, server *testnet.Pod
	ref            *testnet.Reference
	pair           testnet.Pair
	// sink receives the UDP generator's datagrams (UDP's topology only).
	sink *sink
}

// bench holds what the runs share.
type bench struct {
	opts  Options
	logf  func(string, ...any)
	rcv   *receiver
	topos map[Kind]*world
	// empty is the program of the Empty runs.
	empty *ebpf.Program
	// udpgen is the UDP generator's binary (cmd/udpgen, see Generator).
	udpgen string
}

// world returns the topology of a kind of traffic, building it on first
// use. TCP's keeps the veths' offloads, for setOffloads to switch; UDP's
// is testnet's default, one segment per skb.
func (b *bench) world(ctx context.Context, kind Kind) (*world, error) {
	if w, ok := b.topos[kind]; ok {
		return w, nil
	}
	b.logf("building the topology for %s", kind)
	topo, err := testnet.Build(ctx, testnet.Spec{
		Offloads: kind == TCP,
		Nodes: []testnet.NodeSpec{
			{Name: "a", Zone: "zone-a", Pods: []string{"client"}},
			{Name: "b", Zone: "zone-b", Pods: []string{"server"}},
		},
	})
	if err != nil {
		return nil, err
	}
	w := &world{topo: topo, node: topo.Node("a"), client: topo.Pod("client"), server: topo.Pod("server")}
	b.topos[kind] = w
	w.pair = testnet.Pair{Src: w.client.IPv4, Dst: w.server.IPv4}
	w.ref = testnet.NewReference(referencePriority)
	if err := w.ref.Watch(ctx, w.node.NS, w.pair); err != nil {
		return nil, err
	}
	if kind == UDP {
		if w.sink, err = installSink(ctx, w.server.NS, w.client.IPv4); err != nil {
			return nil, err
		}
	}
	if b.opts.Conntrack {
		if err := trackConnections(ctx, w.node.NS); err != nil {
			return nil, err
		}
	}
	return w, nil
}

// trackConnections loads conntrack in namespace ns (see
// Options.Conntrack) with a rule that counts new connections at
// prerouting, before everything else there.
func trackConnections(ctx context.Context, ns string) error {
	const ruleset = "table inet kzn_ct {\n  chain pre {\n    type filter hook prerouting priority -150; policy accept;\n    ct state new counter\n  }\n}\n"
	if _, err := testnet.Exec(ctx, ns, "sh", "-c", "nft -f - <<'EOF'\n"+ruleset+"EOF\n"); err != nil {
		return fmt.Errorf("loading conntrack in node a: %w", err)
	}
	return nil
}

func (b *bench) close() {
	for _, w := range b.topos {
		if err := w.topo.Close(); err != nil {
			b.logf("removing the topology: %v", err)
		}
	}
}

// setOffloads switches TSO, GSO and GRO on both ends of every veth of the
// topology: on is the veth defaults (TSO and GSO on, GRO off), off all
// three off. Off leaves the GSO segment limit alone, unlike testnet's
// default topology, so TCP may still hand the stack multi-segment skbs
// (see check).
func (w *world) setOffloads(ctx context.Context, on bool) error {
	state := []string{"tso", "off", "gso", "off", "gro", "off"}
	if on {
		state = []string{"tso", "on", "gso", "on", "gro", "off"}
	}
	devs := [][2]string{}
	for _, n := range w.topo.Nodes {
		devs = append(devs, [2]string{w.topo.Fabric, fmt.Sprintf("n%d", n.Index)}, [2]string{n.NS, "fab0"})
		for _, p := range n.Pods {
			devs = append(devs, [2]string{n.NS, p.HostVeth}, [2]string{p.NS, "eth0"})
		}
	}
	for _, d := range devs {
		if _, err := testnet.Exec(ctx, d[0], append([]string{"ethtool", "-K", d[1]}, state...)...); err != nil {
			return fmt.Errorf("switching offloads: %w", err)
		}
	}
	return nil
}
