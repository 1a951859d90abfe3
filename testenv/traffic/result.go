package traffic

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Result is what a benchmark measured.
type Result struct {
	// Options are the run's, defaults applied.
	Options Options
	// Host names the CPU and the mitigations the per-packet cost of a
	// BPF program depends on.
	Host string
	// LoadStart and LoadEnd are the one-minute load averages when the
	// benchmark started and ended: other work on the host widens the
	// noise band.
	LoadStart, LoadEnd string
	// Cases in the order they ran.
	Cases []CaseResult
	// Mismatches lists every run whose counts were not exact.
	Mismatches []string
	// Unchecked lists runs with a part of the check left out, and why.
	Unchecked []string
}

// CaseResult is one case's runs, in rounds: Without[i], Empty[i] and
// With[i] ran one after the other.
type CaseResult struct {
	Case                 Case
	Without, Empty, With []RunResult
}

// Exact reports whether every run with the agent counted exactly.
func (r *Result) Exact() bool { return len(r.Mismatches) == 0 }

// rates returns the rates of runs.
func rates(runs []RunResult) []float64 {
	out := make([]float64, len(runs))
	for i, r := range runs {
		out[i] = r.Rate
	}
	return out
}

// median returns the median of xs (0 for none).
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// band formats the range of xs, "-" for none.
func band(xs []float64) string {
	if len(xs) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f-%.2f", slices.Min(xs), slices.Max(xs))
}

// RoundRatios are runs[i]/Without[i] of each round.
func (c CaseResult) RoundRatios(runs []RunResult) []float64 {
	return roundRatios(runs, c.Without)
}

// PairedRatios are With[i]/Empty[i] of each round: the agent against the
// empty program in runs next to each other, so that a change of the
// host's speed between rounds, which moves every mode's median, cancels.
func (c CaseResult) PairedRatios() []float64 {
	return roundRatios(c.With, c.Empty)
}

// roundRatios are runs[i]/base[i] of each round both ran in, leaving out
// a round whose base has no rate.
func roundRatios(runs, base []RunResult) []float64 {
	var out []float64
	for i := range min(len(runs), len(base)) {
		if base[i].Rate > 0 {
			out = append(out, runs[i].Rate/base[i].Rate)
		}
	}
	return out
}

// NoiseRatios are the ratios of consecutive runs without the agent: what
// the ratio looks like when nothing changed between two runs.
func (c CaseResult) NoiseRatios() []float64 {
	var out []float64
	for i := 1; i < len(c.Without); i++ {
		if c.Without[i-1].Rate > 0 {
			out = append(out, c.Without[i].Rate/c.Without[i-1].Rate)
		}
	}
	return out
}

// Ratio is the median rate of runs over the median without anything
// attached.
func (c CaseResult) Ratio(runs []RunResult) float64 {
	w := median(rates(c.Without))
	if w == 0 {
		return 0
	}
	return median(rates(runs)) / w
}

// CostPerPacket is the time what runs attached added per packet, from the
// medians: 1/runs - 1/without, for UDP (kpps); zero for TCP, whose rate is
// not in packets.
func (c CaseResult) CostPerPacket(runs []RunResult) time.Duration {
	w, a := median(rates(c.Without)), median(rates(runs))
	if c.Case.Kind != UDP || w == 0 || a == 0 {
		return 0
	}
	return time.Duration(1e6/a - 1e6/w) // kpps: 1e6/rate is ns per packet
}

// progNS is the median ns per run of the program of runs, "-" without
// program statistics.
func progNS(runs []RunResult) string {
	var ns []float64
	for _, r := range runs {
		if r.ProgRuns > 0 {
			ns = append(ns, float64(r.ProgTime.Nanoseconds())/float64(r.ProgRuns))
		}
	}
	if len(ns) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", median(ns))
}

// WriteTable writes the result as one table, a row per case, and the
// definitions of its columns.
func (r *Result) WriteTable(out io.Writer) error {
	o := r.Options
	fmt.Fprintf(out, "host: %s; load average %s at the start, %s at the end\n", r.Host, r.LoadStart, r.LoadEnd)
	fmt.Fprintf(out, "%d rounds of %s runs per case, each round without anything attached at node a, with an empty program attached the way the agent attaches its own, and with the agent, in an order that rotates from round to round; rate medians over the runs.\n", o.Runs, o.Duration)
	fmt.Fprintln(out, "UDP: the generator's thread, and the datagrams' way through the namespaces in its softirqs, on the last CPU; the benchmark's other threads and the agent on the others (the agent's user space is its CPU column, not in the rates).")
	if o.Conntrack {
		fmt.Fprintln(out, "node a tracks connections (-conntrack), as kube-proxy nodes do: conntrack looks up every packet there before the agent's hook.")
	} else {
		fmt.Fprintln(out, "node a keeps no connection tracking: it only routes (-conntrack tracks connections there, as kube-proxy nodes do).")
	}
	fmt.Fprintln(out, "ratio: median with / median without; the noise band under it: min-max of the ratios of consecutive runs without (the spread when nothing changes). rounds: min-max of with/without per round.")
	fmt.Fprintln(out, "empty: the same for the empty program. cost/pkt: time added per packet, 1/rate - 1/without of the medians (UDP), to set against the program's ns/run.")
	fmt.Fprintln(out, "with/empty: median over the rounds of with / empty in the same round (runs next to each other, so that the host's drift between rounds cancels), and its min-max: the agent's cost beyond the hook's.")
	fmt.Fprintln(out, "agent CPU: median utime+stime over a run's traffic; VmHWM: largest peak RSS; prog: median ns/run of the agent's program over a run's traffic (kernel.bpf_stats_enabled), and its median runs; flows: largest batch.")
	if o.NoBPFStats {
		fmt.Fprintln(out, "program statistics off (-no-bpf-stats): no program run time or count.")
	} else {
		fmt.Fprintln(out, "program statistics on (kernel.bpf_stats_enabled): every program run, the empty one's too, also pays two clock reads, in the rates and partly in ns/run; -no-bpf-stats leaves them out.")
	}
	fmt.Fprintln(out, "exact: runs whose counts equal nftables' at node a. TCP with GSO skbs: bytes nftables' plus 52 header bytes per segment beyond its skbs, packets the client's TcpOutSegs+TcpRetransSegs when no skb was lost before node a.")
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CASE\tUNIT\tWITHOUT\tEMPTY\tWITH\tNOISE\tEMPTY RATIO\tRATIO\tROUNDS\tWITH/EMPTY\tEMPTY COST/PKT\tCOST/PKT\tEMPTY NS/RUN\tPROG NS/RUN\tPROG RUNS\tAGENT CPU\tVmHWM\tFLOWS\tEXACT")
	for _, c := range r.Cases {
		var cpu, runs []float64
		var rss int64
		var flows, exact, unchecked int
		for _, w := range c.With {
			cpu = append(cpu, w.AgentCPU.Seconds())
			if w.ProgRuns > 0 {
				runs = append(runs, float64(w.ProgRuns))
			}
			rss = max(rss, w.AgentRSS)
			flows = max(flows, w.MaxBatchFlows)
			if w.Mismatch == "" {
				exact++
			}
			if w.Unchecked != "" {
				unchecked++
			}
		}
		progRuns := "-"
		if len(runs) > 0 {
			progRuns = fmt.Sprintf("%.0f", median(runs))
		}
		exactness := fmt.Sprintf("%d/%d", exact, len(c.With))
		if unchecked > 0 {
			exactness += fmt.Sprintf(" (%d partly unchecked)", unchecked)
		}
		emptyCost, cost := "-", "-"
		if c.Case.Kind == UDP {
			emptyCost = fmt.Sprintf("%d ns", c.CostPerPacket(c.Empty).Nanoseconds())
			cost = fmt.Sprintf("%d ns", c.CostPerPacket(c.With).Nanoseconds())
		}
		paired := c.PairedRatios()
		fmt.Fprintf(tw, "%s\t%s\t%.2f\t%.2f\t%.2f\t%s\t%.2f\t%.2f\t%s\t%.2f (%s)\t%s\t%s\t%s\t%s\t%s\t%.2f s\t%.1f MiB\t%d\t%s\n",
			c.Case.Title, c.Case.Unit(), median(rates(c.Without)), median(rates(c.Empty)), median(rates(c.With)),
			band(c.NoiseRatios()), c.Ratio(c.Empty), c.Ratio(c.With), band(c.RoundRatios(c.With)), median(paired), band(paired),
			emptyCost, cost, progNS(c.Empty), progNS(c.With), progRuns, median(cpu), float64(rss)/(1<<20), flows, exactness)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, u := range r.Unchecked {
		fmt.Fprintf(out, "unchecked: %s\n", u)
	}
	for _, m := range r.Mismatches {
		fmt.Fprintf(out, "NOT EXACT: %s\n", m)
	}
	return nil
}

// describeHost names the CPU model and the mitigations a BPF program's
// per-packet cost depends on: Spectre SRSO (Safe RET makes every return
// dearer) and Spectre v2 (retpolines make every indirect call dearer).
func describeHost() string {
	model := "unknown CPU"
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if rest, ok := strings.CutPrefix(sc.Text(), "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(rest), ":"))
				break
			}
		}
		f.Close()
	}
	kernel := "unknown"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(b))
	}
	out := fmt.Sprintf("%s, %d CPUs, Linux %s", model, runtime.NumCPU(), kernel)
	for _, v := range []string{"spec_rstack_overflow", "spectre_v2"} {
		state := "unknown"
		if b, err := os.ReadFile("/sys/devices/system/cpu/vulnerabilities/" + v); err == nil {
			state = strings.TrimSpace(string(b))
		}
		out += fmt.Sprintf(", %s: %s", v, state)
	}
	return out
}

// loadAverage returns the one-minute load average, "?" when unreadable.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) > 0 {
		return f[0]
	}
	return "?"
}
