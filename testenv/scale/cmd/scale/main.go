// Command scale runs the scale simulation (package testenv/scale) and
// prints its table: a real kube-apiserver and etcd with simulated nodes and
// pods, the real server, a real VictoriaMetrics or Prometheus, and simulated agents
// sending at an offered rate while pods churn. Progress goes to stderr,
// the table to stdout. It needs no root.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/kubezonnet/kubezonnet/testenv/scale"
)

func main() {
	opts, verbose := parseFlags()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, opts, verbose); err != nil {
		fmt.Fprintf(os.Stderr, "scale: %v\n", err)
		os.Exit(1)
	}
}

// parseFlags decodes the command line into Options.
func parseFlags() (scale.Options, bool) {
	d := scale.Defaults
	var o scale.Options
	flag.IntVar(&o.Nodes, "nodes", d.Nodes, "nodes")
	flag.IntVar(&o.PodsPerNode, "pods-per-node", d.PodsPerNode, "pods per node (at most 250)")
	flag.IntVar(&o.Zones, "zones", d.Zones, "zones the nodes are spread over")
	flag.IntVar(&o.PeersPerPod, "peers-per-pod", d.PeersPerPod, "pods each pod sends to (sets the live pod pairs)")
	flag.IntVar(&o.Agents, "agents", d.Agents, "simulated agents, one per node (at most -nodes)")
	flag.IntVar(&o.FlowsPerBatch, "flows-per-batch", d.FlowsPerBatch, "flows per batch")
	flag.Float64Var(&o.BatchesPerSecond, "batches-per-second", d.BatchesPerSecond, "offered batches per second, all agents together")
	flag.DurationVar(&o.Duration, "duration", d.Duration, "how long the agents send")
	flag.Float64Var(&o.ChurnPerSecond, "churn-per-second", d.ChurnPerSecond, "pods replaced per second (same address, new name and UID)")
	flag.BoolVar(&o.NoReleases, "no-releases", false, "agents report no address release, as agents that cannot see them (the baseline of misattribution under churn)")
	flag.DurationVar(&o.PushInterval, "push-interval", d.PushInterval, "the server's --push-interval")
	flag.IntVar(&o.MaxPodPairs, "max-pod-pairs", d.MaxPodPairs, "the server's --max-pod-pairs")
	flag.StringVar(&o.Bin, "bin", "", "kubezonnet binary; empty builds this checkout")
	flag.Uint64Var(&o.Seed, "seed", d.Seed, "seed of the traffic and the churn")
	flag.StringVar(&o.ServerCPUs, "server-cpus", "", `pin the server to these CPUs (taskset list, e.g. "0") and everything else to the others, the receiver at a lower priority than the agents and the control plane`)
	flag.BoolVar(&o.Pregenerate, "pregenerate", false, "generate and encode every batch before sending (needs -churn-per-second 0): offers rates beyond what the machine generates live")
	flag.Func("server-flag", "a flag added to the server's command line, e.g. --checkpoint-interval=1h (repeatable)", func(v string) error {
		o.ServerFlags = append(o.ServerFlags, v)
		return nil
	})
	flag.StringVar(&o.Receiver, "receiver", d.Receiver, "the server's remote-write receiver: "+scale.ReceiverVictoriaMetrics+" or "+scale.ReceiverPrometheus)
	verbose := flag.Bool("v", false, "copy the programs' output to stderr")
	flag.Parse()
	return o, *verbose
}

func run(ctx context.Context, opts scale.Options, verbose bool) error {
	opts.Output = os.Stderr
	if verbose {
		opts.ProgramOutput = os.Stderr
	}
	res, err := scale.Run(ctx, opts)
	if err != nil {
		return err
	}
	return res.WriteTable(os.Stdout)
}
