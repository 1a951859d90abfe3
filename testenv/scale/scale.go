package scale

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/client-go/kubernetes"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
	"github.com/kubezonnet/kubezonnet/testenv"
)

// VictoriaMetricsBinary is the Debian package's VictoriaMetrics, the
// server's remote-write receiver by default.
const VictoriaMetricsBinary = "/usr/bin/victoria-metrics"

// Receivers of the server's remote-write (Options.Receiver).
const (
	ReceiverVictoriaMetrics = "VictoriaMetrics"
	ReceiverPrometheus      = "Prometheus"
)

// Options size a run. Zero fields take the defaults of Defaults.
type Options struct {
	// Nodes and PodsPerNode size the cluster (PodsPerNode at most 250: a
	// node's pod range is a /24).
	Nodes, PodsPerNode int
	// Zones the nodes are spread over, round robin.
	Zones int
	// PeersPerPod is how many pods each pod sends to, fixed for the run
	// (chosen at random across the cluster, so most are in another zone).
	// Together with churn it sets the number of live pod pairs.
	PeersPerPod int
	// Agents is the number of simulated agents, one per node from the
	// first; at most Nodes.
	Agents int
	// FlowsPerBatch is the number of flows in one batch (before merging
	// flows with the same key).
	FlowsPerBatch int
	// BatchesPerSecond is the offered rate, over all agents.
	BatchesPerSecond float64
	// Duration of the sending.
	Duration time.Duration
	// ChurnPerSecond pods are replaced (deleted, and another pod created
	// with the same address) per second while sending.
	ChurnPerSecond float64
	// NoReleases makes the agents report no release
	// (wire.Batch.Released), as agents that cannot see them: the
	// baseline of misattribution under churn.
	NoReleases bool
	// PushInterval is the server's --push-interval.
	PushInterval time.Duration
	// MaxPodPairs is the server's --max-pod-pairs.
	MaxPodPairs int
	// Bin is the kubezonnet binary; empty builds it into the run's
	// temporary directory.
	Bin string
	// Output receives progress lines; nil discards them.
	Output io.Writer
	// ProgramOutput receives the output of the API server, etcd, the
	// server and VictoriaMetrics; nil keeps their last lines only, for
	// error messages.
	ProgramOutput io.Writer
	// Seed makes the traffic and the churn reproducible.
	Seed uint64
	// ServerCPUs, when set (a taskset list such as "0"), pins the server
	// to those CPUs and everything else (this process, its agents, the
	// control plane and the receiver) to the others, so the server's
	// figures are its own; the receiver runs there at a lower priority
	// (receiverNice).
	ServerCPUs string
	// Pregenerate generates and encodes every batch before the sending
	// starts (Duration x BatchesPerSecond of them), so that this process
	// offers batches at a rate the machine could not generate them at: the
	// profile that finds the server's saturation. It needs ChurnPerSecond
	// 0 (a flow belongs to the pods of when it was generated).
	Pregenerate bool
	// ServerFlags are added to the server's command line (they may
	// override the simulation's own, which come first).
	ServerFlags []string
	// Receiver is ReceiverVictoriaMetrics (the default) or
	// ReceiverPrometheus (the Debian package's, testenv.PrometheusBinary),
	// in any case.
	Receiver string
}

// Defaults are sized for a 2-core machine: about a minute of sending
// after about half a minute of setup.
var Defaults = Options{
	Nodes: 100, PodsPerNode: 30, Zones: 3, PeersPerPod: 10,
	Agents: 100, FlowsPerBatch: 1000, BatchesPerSecond: 20,
	Duration: time.Minute, ChurnPerSecond: 2,
	PushInterval: 10 * time.Second, MaxPodPairs: 1 << 20, Seed: 1,
	Receiver: ReceiverVictoriaMetrics,
}

func (o *Options) setDefaults() {
	d := Defaults
	set := func(v *int, def int) {
		if *v == 0 {
			*v = def
		}
	}
	set(&o.Nodes, d.Nodes)
	set(&o.PodsPerNode, d.PodsPerNode)
	set(&o.Zones, d.Zones)
	set(&o.PeersPerPod, d.PeersPerPod)
	set(&o.Agents, d.Agents)
	set(&o.FlowsPerBatch, d.FlowsPerBatch)
	set(&o.MaxPodPairs, d.MaxPodPairs)
	if o.BatchesPerSecond == 0 {
		o.BatchesPerSecond = d.BatchesPerSecond
	}
	if o.Duration == 0 {
		o.Duration = d.Duration
	}
	if o.PushInterval == 0 {
		o.PushInterval = d.PushInterval
	}
	switch {
	case o.Receiver == "":
		o.Receiver = d.Receiver
	case strings.EqualFold(o.Receiver, ReceiverVictoriaMetrics):
		o.Receiver = ReceiverVictoriaMetrics
	case strings.EqualFold(o.Receiver, ReceiverPrometheus):
		o.Receiver = ReceiverPrometheus
	}
	o.Agents = min(o.Agents, o.Nodes)
}

// Validate checks the options after defaults were applied.
func (o *Options) Validate() error {
	var errs []error
	if o.Nodes < 1 || o.Nodes > 16384 {
		errs = append(errs, fmt.Errorf("nodes %d: want 1 to 16384", o.Nodes))
	}
	if o.PodsPerNode < 1 || o.PodsPerNode > 250 {
		errs = append(errs, fmt.Errorf("pods per node %d: want 1 to 250", o.PodsPerNode))
	}
	if o.Zones < 1 || o.Zones > 26 {
		errs = append(errs, fmt.Errorf("zones %d: want 1 to 26", o.Zones))
	}
	if o.Nodes*o.PodsPerNode < 2 {
		errs = append(errs, errors.New("at least two pods are needed"))
	}
	if o.PeersPerPod < 1 || o.Agents < 1 || o.FlowsPerBatch < 1 || o.BatchesPerSecond <= 0 || o.Duration <= 0 {
		errs = append(errs, errors.New("peers per pod, agents, flows per batch, batches per second and duration must be positive"))
	}
	if o.ChurnPerSecond < 0 {
		errs = append(errs, fmt.Errorf("churn per second %g: must not be negative", o.ChurnPerSecond))
	}
	if o.Pregenerate && o.ChurnPerSecond != 0 {
		errs = append(errs, fmt.Errorf("pregenerated batches need churn 0, not %g pods per second: their flows belong to the pods of before the sending", o.ChurnPerSecond))
	}
	if o.Receiver != ReceiverVictoriaMetrics && o.Receiver != ReceiverPrometheus {
		errs = append(errs, fmt.Errorf("receiver %q: want %s or %s", o.Receiver, ReceiverVictoriaMetrics, ReceiverPrometheus))
	}
	if o.MaxPodPairs < 1 || o.PushInterval <= 0 {
		errs = append(errs, errors.New("max pod pairs and push interval must be positive"))
	}
	return errors.Join(errs...)
}

// Run sets the cluster up, sends for opts.Duration, waits for the server's
// push of everything acknowledged and compares. Everything it starts is
// stopped, and its temporary directory removed, before it returns.
func Run(ctx context.Context, opts Options) (res Result, err error) {
	opts.setDefaults()
	if err := opts.Validate(); err != nil {
		return res, err
	}
	res.Options = opts
	progress := opts.Output
	if progress == nil {
		progress = io.Discard
	}
	say := func(format string, args ...any) {
		fmt.Fprintf(progress, "scale: "+format+"\n", args...)
	}
	setupStart := time.Now()

	dir, err := os.MkdirTemp("", "kubezonnet-scale-")
	if err != nil {
		return res, fmt.Errorf("creating the temporary directory: %w", err)
	}
	defer func() {
		if rerr := os.RemoveAll(dir); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}()
	bin := opts.Bin
	if bin == "" {
		say("building kubezonnet")
		if bin, err = testutil.BuildKubezonnet(ctx, dir); err != nil {
			return res, err
		}
	}
	serverCmd := []string{bin}
	if opts.ServerCPUs != "" {
		others, restore, perr := pinOthers(ctx, opts.ServerCPUs)
		if perr != nil {
			return res, perr
		}
		defer func() { err = errors.Join(err, restore()) }()
		say("server on CPUs %s, everything else on %s", opts.ServerCPUs, others)
		serverCmd = []string{"taskset", "-c", opts.ServerCPUs, bin}
	}

	say("starting etcd and kube-apiserver")
	cp, err := testenv.StartControlPlane(ctx, testenv.Options{Output: opts.ProgramOutput, TempDir: dir})
	if err != nil {
		return res, err
	}
	defer func() { err = errors.Join(err, cp.Stop()) }()
	cfg := cp.AdminConfig()
	cfg.QPS, cfg.Burst = 2000, 4000 // the setup is the only client
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return res, fmt.Errorf("creating the admin client: %w", err)
	}
	if err := cp.EnsureServiceAccount(ctx, Namespace, "default"); err != nil {
		return res, err
	}
	rng := rand.New(rand.NewPCG(opts.Seed, 0))
	w := newWorld(opts, client, rng)
	say("creating %d nodes and %d pods", opts.Nodes, opts.Nodes*opts.PodsPerNode)
	if err := w.create(ctx); err != nil {
		return res, err
	}

	ports, err := freePorts(2)
	if err != nil {
		return res, err
	}
	v, rcvProc, err := startReceiver(opts, dir, ports[0])
	if err != nil {
		return res, err
	}
	defer rcvProc.Kill()
	if err := waitOK(ctx, v.ready(), rcvProc); err != nil {
		return res, err
	}

	kubeconfig := filepath.Join(dir, "server.kubeconfig")
	if err := cp.WriteKubeconfig(kubeconfig, cfg.BearerToken); err != nil {
		return res, err
	}
	serverURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	say("starting the server")
	srv, err := testenv.StartProcess("server", serverCmd[0], append(append(serverCmd[1:],
		"server", "--kubeconfig", kubeconfig, "--auth-mode", "none",
		"--listen-address", "127.0.0.1:"+strconv.Itoa(ports[1]),
		"--remote-write-url", v.url+"/api/v1/write",
		"--push-interval", opts.PushInterval.String(),
		"--remote-write-min-backoff", "200ms", "--remote-write-max-backoff", "2s",
		"--state-dir", filepath.Join(dir, "state"),
		"--max-pod-pairs", strconv.Itoa(opts.MaxPodPairs),
		"--flow-log-classes", "none", "--log-format", "text", "--log-level", "warn",
	), opts.ServerFlags...), testenv.ProcessOptions{Output: opts.ProgramOutput})
	if err != nil {
		return res, err
	}
	defer srv.Kill()
	if err := waitOK(ctx, serverURL+"/readyz", srv); err != nil {
		return res, err
	}
	res.Setup = time.Since(setupStart)

	agents := make([]*agent, opts.Agents)
	for i := range agents {
		if agents[i], err = newAgent(w, i, serverURL, opts.Seed); err != nil {
			return res, err
		}
	}
	if opts.Pregenerate {
		perAgent := int(math.Ceil(opts.Duration.Seconds() * opts.BatchesPerSecond / float64(opts.Agents)))
		say("generating and encoding %d batches per agent", perAgent)
		var wg sync.WaitGroup
		for _, a := range agents {
			wg.Go(func() { a.pregenerate(perAgent, opts.FlowsPerBatch) })
		}
		wg.Wait()
	}
	say("sending for %s: %d agents, %g batches/s of %d flows, %g pods replaced/s",
		opts.Duration, opts.Agents, opts.BatchesPerSecond, opts.FlowsPerBatch, opts.ChurnPerSecond)
	cpu0, err := testenv.ProcessCPUTime(srv.Pid())
	if err != nil {
		return res, err
	}
	interval := time.Duration(float64(opts.Agents) / opts.BatchesPerSecond * float64(time.Second))
	stop := make(chan struct{})
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(agents)+1)
	sendStart := time.Now()
	for i, a := range agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if errs[i] = a.run(runCtx, interval, opts.FlowsPerBatch, stop); errs[i] != nil {
				cancel()
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		churnRng := rand.New(rand.NewPCG(opts.Seed, 1))
		if res.Churned, errs[len(agents)] = w.churn(runCtx, opts.ChurnPerSecond, churnRng, stop); errs[len(agents)] != nil {
			cancel()
		}
	}()
	select {
	case <-time.After(opts.Duration):
	case <-runCtx.Done():
	}
	close(stop)
	wg.Wait()
	res.Sending = time.Since(sendStart)
	if err := errors.Join(errs...); err != nil {
		return res, fmt.Errorf("sending: %w", err)
	}
	cpu1, err := testenv.ProcessCPUTime(srv.Pid())
	if err != nil {
		return res, err
	}
	res.ServerCPU = cpu1 - cpu0

	truth := map[pair]flow.Counts{}
	zones := map[zonePair]flow.Counts{}
	var lastAck time.Time
	for _, a := range agents {
		if a.ready != nil {
			a.tallyReady()
		}
		res.Flows += a.flows
		res.Batches += a.batches
		res.ReleaseBatches += a.releaseBatches
		res.Notices += a.noticesSent.Load()
		res.Retries += a.retries
		res.latencies = append(res.latencies, a.latencies...)
		for p, c := range a.truth {
			t := truth[p]
			t.Add(c)
			truth[p] = t
			res.SentBytes += c.Bytes
			res.SentPackets += c.Packets
		}
		for z, c := range a.zones {
			t := zones[z]
			t.Add(c)
			zones[z] = t
		}
		if a.lastAck.After(lastAck) {
			lastAck = a.lastAck
		}
	}
	slices.Sort(res.latencies)

	say("waiting for a push after the last acknowledgement")
	// The bound only turns a hang into a failure: a receiver on one core
	// may take over a minute and a half for a snapshot of 1.8 million
	// series (Prometheus here), and the push in flight at the last
	// acknowledgement is finished before one taken after it starts.
	if err := waitPush(ctx, serverURL, lastAck, 3*opts.PushInterval+5*time.Minute); err != nil {
		return res, err
	}
	if err := res.compare(ctx, v, w, truth, zones, 2*opts.PushInterval+30*time.Second); err != nil {
		return res, err
	}
	m, err := scrape(ctx, serverURL+"/metrics")
	if err != nil {
		return res, err
	}
	res.ServerSeries = int64(m["kubezonnet_server_series"].sum)
	res.PushDuration = time.Duration(m["kubezonnet_server_remote_write_push_duration_seconds"].max * float64(time.Second))
	res.SnapshotDuration = time.Duration(m["kubezonnet_server_remote_write_snapshot_duration_seconds"].max * float64(time.Second))
	res.Held = int64(m[`kubezonnet_server_ingest_rejected_total{reason="awaiting_pod"}`].sum)
	res.Folded = int64(m["kubezonnet_server_pod_pairs_folded_total"].sum)
	res.Unresolved = int64(m["kubezonnet_server_unresolved_total"].sum)
	res.OrderTimeouts = int64(m["kubezonnet_server_release_order_timeouts_total"].sum)
	if res.PeakRSS, err = testenv.ProcessPeakRSS(srv.Pid()); err != nil {
		return res, err
	}
	for p := range truth {
		if w.zoneOfName(p.src) != w.zoneOfName(p.dst) {
			res.CrossZonePairs++
		}
	}
	return res, nil
}

// receiverNice is the niceness of the receiver when the server has CPUs
// of its own (Options.ServerCPUs): on the core the rest shares, the
// receiver's ingest of each push (seconds of CPU for a million series)
// would otherwise hold up the simulated agents, and the API server's
// churn, which on a cluster run on machines of their own; the agents'
// latency figures would be theirs, not the server's. The last push's
// duration is taken after the sending ended, with the core to itself.
const receiverNice = 10

// startReceiver starts opts.Receiver on 127.0.0.1:port with its data in
// dir.
func startReceiver(opts Options, dir string, port int) (receiver, *testenv.Process, error) {
	addr := "127.0.0.1:" + strconv.Itoa(port)
	v := receiver{kind: opts.Receiver, url: "http://" + addr}
	start := func(name, bin string, args []string) (*testenv.Process, error) {
		if opts.ServerCPUs != "" {
			args = append([]string{"-n", strconv.Itoa(receiverNice), bin}, args...)
			bin = "nice"
		}
		return testenv.StartProcess(name, bin, args, testenv.ProcessOptions{Output: opts.ProgramOutput})
	}
	if opts.Receiver == ReceiverPrometheus {
		cfg := filepath.Join(dir, "prometheus.yml")
		if err := os.WriteFile(cfg, []byte("global: {}\n"), 0o644); err != nil {
			return v, nil, err
		}
		args := append(testenv.PrometheusArgs(cfg, filepath.Join(dir, "prometheus"), addr), "--log.level=warn",
			// The exactness queries read every pod-pair series at once.
			"--query.max-samples=1000000000", "--query.timeout=10m")
		p, err := start("prometheus", testenv.PrometheusBinary, args)
		return v, p, err
	}
	p, err := start("victoria-metrics", VictoriaMetricsBinary, []string{
		"-httpListenAddr=" + addr,
		"-storageDataPath=" + filepath.Join(dir, "vm"),
		"-search.disableCache", "-search.latencyOffset=0s",
		// The exactness queries read every pod-pair series at once.
		"-search.maxUniqueTimeseries=100000000", "-search.maxQueryDuration=10m",
		"-loggerLevel=WARN",
	})
	return v, p, err
}

// waitPush waits until the receiver has, in full, a snapshot the server
// took after lastAck.
func waitPush(ctx context.Context, serverURL string, lastAck time.Time, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	after := float64(lastAck.UnixMilli()) / 1000
	for {
		m, err := scrape(ctx, serverURL+"/metrics")
		if err == nil && m["kubezonnet_server_remote_write_delivered_snapshot_timestamp_seconds"].max > after {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no push completed within %s after the last acknowledgement (last scrape error: %v)", timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// waitOK polls u until it answers 200, p exits, or a minute passes.
func waitOK(ctx context.Context, u string, p *testenv.Process) error {
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := testenv.HTTPGet(ctx, u)
		if err == nil {
			return nil
		}
		select {
		case <-p.Done():
			return fmt.Errorf("waiting for %s: program exited: %v; output:\n%s", u, p.Err(), p.Output())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("waiting for %s: %v; output:\n%s", u, err, p.Output())
		}
	}
}

// freePorts returns n distinct ports free on 127.0.0.1 now.
func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free port on 127.0.0.1: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// pinOthers pins this process (every thread; the programs it starts
// inherit it) to the CPUs it may use other than serverCPUs, a taskset
// list, and returns them as one, with the function that undoes it.
func pinOthers(ctx context.Context, serverCPUs string) (string, func() error, error) {
	var server unix.CPUSet
	if err := parseCPUList(serverCPUs, &server); err != nil {
		return "", nil, err
	}
	others, restore, err := testutil.KeepProcessOff(ctx, &server)
	if err != nil {
		return "", nil, fmt.Errorf("server CPUs %q: %w", serverCPUs, err)
	}
	if others == "" {
		return "", nil, fmt.Errorf("server CPUs %q leave no CPU for the rest", serverCPUs)
	}
	return others, restore, nil
}

// parseCPUList parses a taskset list ("0", "0,2", "1-3") into set.
func parseCPUList(list string, set *unix.CPUSet) error {
	for _, part := range strings.Split(list, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		b := a
		if err == nil && isRange {
			b, err = strconv.Atoi(hi)
		}
		if err != nil || a < 0 || b < a || b >= 1024 {
			return fmt.Errorf("server CPUs %q: want a list such as 0 or 0,2 or 1-3", list)
		}
		for c := a; c <= b; c++ {
			set.Set(c)
		}
	}
	return nil
}
