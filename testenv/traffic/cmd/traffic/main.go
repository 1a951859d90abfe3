// Command traffic runs the traffic benchmark (package testenv/traffic) and
// prints its table: iperf3 and a UDP generator through a router namespace,
// alternately without and with the real agent attached, with the agent's
// counts checked against nftables in every run. Progress goes to stderr,
// the table to stdout. It needs root, and exits 1 when any run's counts
// were not exact.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/kubezonnet/kubezonnet/testenv/traffic"
)

func main() {
	opts, verbose := parseFlags()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, opts, verbose); err != nil {
		fmt.Fprintf(os.Stderr, "traffic: %v\n", err)
		os.Exit(1)
	}
}

// parseFlags decodes the command line into Options.
func parseFlags() (traffic.Options, bool) {
	d := traffic.Defaults
	var o traffic.Options
	var names []string
	for _, c := range traffic.Cases {
		names = append(names, c.Name)
	}
	flag.IntVar(&o.Runs, "runs", d.Runs, "rounds per case, each a run without anything attached, one with an empty program, one with the agent")
	flag.DurationVar(&o.Duration, "duration", d.Duration, "traffic time of one run (iperf3 rounds up to whole seconds)")
	flag.Func("cases", "comma-separated cases to run (default all: "+strings.Join(names, ",")+")", func(v string) error {
		for _, n := range strings.Split(v, ",") {
			if n = strings.TrimSpace(n); n != "" {
				o.Cases = append(o.Cases, n)
			}
		}
		return nil
	})
	flag.StringVar(&o.Bin, "bin", "", "kubezonnet binary; empty builds this checkout")
	flag.Func("agent-flag", "a flag added to the agent's command line, e.g. --flow-table-memory=256 (repeatable)", func(v string) error {
		o.AgentFlags = append(o.AgentFlags, v)
		return nil
	})
	flag.BoolVar(&o.Conntrack, "conntrack", false, "make node a track connections, as kube-proxy nodes do (conntrack looks up every packet before the agent's hook)")
	flag.BoolVar(&o.NoBPFStats, "no-bpf-stats", false, "leave kernel.bpf_stats_enabled off (no program run time or count; no timing overhead per program run)")
	verbose := flag.Bool("v", false, "copy the agent's and iperf3's output to stderr")
	flag.Parse()
	return o, *verbose
}

func run(ctx context.Context, opts traffic.Options, verbose bool) error {
	opts.Output = os.Stderr
	if verbose {
		opts.ProgramOutput = os.Stderr
	}
	res, err := traffic.Run(ctx, opts)
	if err != nil {
		return err
	}
	if err := res.WriteTable(os.Stdout); err != nil {
		return err
	}
	if !res.Exact() {
		return fmt.Errorf("%d runs with the agent did not count exactly (NOT EXACT above)", len(res.Mismatches))
	}
	return nil
}
