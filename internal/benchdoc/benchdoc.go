// Package benchdoc keeps BENCHMARKS.md what the benchmarks print. Each
// component's figures live in a raw file (benchmarks/<component>.txt:
// the machine, then each command and its output exactly as printed), and
// BENCHMARKS.md shows them in a block rendered from that file. `make bench`
// reruns the commands and rewrites both; a test renders every block again
// from the raw files and fails on any difference, so a figure in the
// document is always one a benchmark printed, on the machine named above
// it, with the command that prints it.
package benchdoc

import (
	"bufio"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Component is one section of BENCHMARKS.md: the commands whose output
// makes its table, run one after the other so that the rows compared with
// each other (a baseline and what it is the baseline of) come from the
// same sitting on the same machine.
type Component struct {
	// Name names the raw file (benchmarks/<Name>.txt) and the block.
	Name string
	// Commands run from the repository's root with bash.
	Commands []string
	// Verbatim shows the output as printed instead of tabulating
	// `go test -bench` lines (a program that prints its own table).
	Verbatim bool
}

// Components are the sections, in the order of BENCHMARKS.md.
var Components = []Component{
	{Name: "bpf", Commands: []string{
		`go test -run '^$' -bench 'BenchmarkNetfilter$|BenchmarkNetfilterReference$' -benchtime 5000000x -count 3 -benchmem ./bpf/`,
		`go test -run '^$' -bench 'BenchmarkNetfilterConntrack$/test-run' -benchtime 5000000x -count 3 -benchmem ./bpf/`,
		`go test -run '^$' -bench 'BenchmarkNetfilterConntrack$/dnat' -benchtime 200000x -count 3 -benchmem ./bpf/`,
		`go test -run '^$' -bench 'BenchmarkNetfilterNewFlow$' -benchtime 2000000x -count 3 -benchmem ./bpf/`,
		`go test -run '^$' -bench 'BenchmarkCgroupSockLookup$' -benchtime 5000000x -count 3 -benchmem ./bpf/`,
		`go test -run '^$' -bench 'BenchmarkDrain$|BenchmarkMerge$' -benchtime 20x -count 3 -benchmem ./bpf/`,
	}},
	{Name: "agent", Commands: []string{
		`go test -run '^$' -bench 'EncodeFlush' -benchmem -benchtime 20x -count 3 -cpu 1 ./agent/`,
		`go test -run '^$' -bench . -benchmem -count 3 -cpu 1 ./internal/wire/`,
	}},
	{Name: "traffic", Verbatim: true, Commands: []string{
		`go run ./testenv/traffic/cmd/traffic`,
		`go run ./testenv/traffic/cmd/traffic -no-bpf-stats -cases udp-1flow,udp-2k-flows,udp-32k-flows-per-s`,
		`go run ./testenv/traffic/cmd/traffic -no-bpf-stats -conntrack -cases udp-1flow,udp-2k-flows,udp-32k-flows-per-s`,
	}},
	{Name: "remotewrite", Commands: []string{
		`go test -run '^$' -bench 'Snapshot' -benchmem -benchtime 20x -count 3 ./internal/remotewrite/`,
		`go test -run '^$' -bench 'PushThroughput' -benchmem -cpu 1 -count 3 ./internal/remotewrite/`,
	}},
	{Name: "server", Commands: []string{
		`go test -run '^$' -bench 'BenchmarkIngestPath|BenchmarkDecodeOnly' -benchmem -benchtime 50x -count 3 -cpu 1 ./server/`,
		`go test -run '^$' -bench 'BenchmarkIngestDurable/agents=8/log=off' -benchmem -benchtime 300x -count 3 -cpu 1,2 ./server/`,
		`go test -run '^$' -bench 'BenchmarkAppendEvent' -benchmem -count 3 -cpu 1 ./server/flowlog/`,
		`go test -run '^$' -bench 'BenchmarkApply' -benchmem -count 3 -cpu 1 ./server/aggregate/`,
		`go test -run '^$' -bench 'BenchmarkMemoryServer|BenchmarkMemoryPodPairs' -benchmem -benchtime 1x -cpu 1 ./server/aggregate/`,
		`go test -run '^$' -bench 'BenchmarkLockHold' -benchtime 20x -count 3 -cpu 2 ./server/aggregate/`,
	}},
	{Name: "durable", Commands: []string{
		`go test -run '^$' -bench 'BenchmarkIngestDurable' -benchtime 50x -count 3 -cpu 1 -benchmem ./server/`,
		`go test -run '^$' -bench 'BenchmarkDurableManyAgents' -benchtime 20000x -count 3 ./server/`,
		`go test -run '^$' -bench 'BenchmarkRestart1M' -benchtime 3x -benchmem ./server/`,
	}},
	{Name: "resolve", Commands: []string{
		`go test -run '^$' -bench 'BenchmarkResolve|BenchmarkIndexMemory' -benchmem -count 3 -cpu 1 ./server/resolve/`,
		`go test -run '^$' -bench 'BenchmarkServiceLookup|BenchmarkServiceMemory' -benchmem -count 3 -cpu 1 ./server/resolve/`,
	}},
	{Name: "scale", Verbatim: true, Commands: []string{
		`go run ./testenv/scale/cmd/scale`,
		`go run ./testenv/scale/cmd/scale -server-cpus 0 -peers-per-pod 250 -batches-per-second 40 -duration 2m -churn-per-second 20`,
		`go run ./testenv/scale/cmd/scale -server-cpus 0 -peers-per-pod 250 -batches-per-second 40 -duration 2m -churn-per-second 20 -no-releases`,
		`GOGC=100 go run ./testenv/scale/cmd/scale -server-cpus 0 -peers-per-pod 250 -batches-per-second 40 -duration 2m -churn-per-second 20`,
		`go run ./testenv/scale/cmd/scale -server-cpus 0 -peers-per-pod 250 -batches-per-second 40 -duration 2m -churn-per-second 20 -receiver Prometheus`,
	}},
	{Name: "saturation", Verbatim: true, Commands: []string{
		`go run ./testenv/scale/cmd/scale -server-cpus 0 -nodes 300 -pods-per-node 30 -agents 300 -peers-per-pod 20 -flows-per-batch 2000 -pregenerate -churn-per-second 0 -batches-per-second 1250 -duration 20s`,
	}},
}

// Tools are benchmark functions that are instruments rather than figures
// (they measure builds named at run time), so no section shows them.
var Tools = []string{"BenchmarkNetfilterObjects"}

// Raw-file line prefixes.
const (
	prefixMachine     = "# machine: "
	prefixMitigations = "# mitigations: "
	prefixCommand     = "# command: "
)

// Raw is a parsed raw file.
type Raw struct {
	Machine, Mitigations string
	Runs                 []Run
}

// Run is one command and what it printed.
type Run struct {
	Command string
	Output  []string
}

// Header returns the raw file's first lines for a machine.
func Header(machine, mitigations string) string {
	return "# raw output of the commands below; `make bench` writes it, BENCHMARKS.md shows it\n" +
		prefixMachine + machine + "\n" + prefixMitigations + mitigations + "\n"
}

// CommandLine returns the line that starts a command's output in a raw file.
func CommandLine(cmd string) string { return prefixCommand + cmd + "\n" }

// Parse reads a raw file.
func Parse(text string) (*Raw, error) {
	r := &Raw{}
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, prefixMachine):
			r.Machine = strings.TrimPrefix(line, prefixMachine)
		case strings.HasPrefix(line, prefixMitigations):
			r.Mitigations = strings.TrimPrefix(line, prefixMitigations)
		case strings.HasPrefix(line, prefixCommand):
			r.Runs = append(r.Runs, Run{Command: strings.TrimPrefix(line, prefixCommand)})
		case strings.HasPrefix(line, "# "):
		default:
			if len(r.Runs) == 0 {
				return nil, fmt.Errorf("output before the first %q line: %q", strings.TrimSpace(prefixCommand), line)
			}
			last := &r.Runs[len(r.Runs)-1]
			last.Output = append(last.Output, line)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if r.Machine == "" {
		return nil, fmt.Errorf("no %q line", strings.TrimSpace(prefixMachine))
	}
	return r, nil
}

// Result is one line of `go test -bench` output.
type Result struct {
	// Name as printed, e.g. "BenchmarkEncodeFlush-2".
	Name string
	// Pkg is the import path the line's "pkg:" header named.
	Pkg    string
	Iters  int64
	Values []Value
}

// Value is one measurement of a result line.
type Value struct {
	Unit string
	V    float64
}

// Results returns every benchmark result line of the runs.
func (r *Raw) Results() ([]Result, error) {
	var out []Result
	for _, run := range r.Runs {
		pkg := ""
		for _, line := range run.Output {
			if p, ok := strings.CutPrefix(line, "pkg: "); ok {
				pkg = strings.TrimSpace(p)
				continue
			}
			if !strings.HasPrefix(line, "Benchmark") {
				continue
			}
			f := strings.Fields(line)
			if len(f) < 4 || len(f)%2 != 0 {
				continue // a benchmark's own log line
			}
			iters, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				continue
			}
			res := Result{Name: f[0], Pkg: pkg, Iters: iters}
			for i := 2; i+1 < len(f); i += 2 {
				v, err := strconv.ParseFloat(f[i], 64)
				if err != nil {
					return nil, fmt.Errorf("%s: value %q of %s: %w", f[0], f[i], f[i+1], err)
				}
				res.Values = append(res.Values, Value{Unit: f[i+1], V: v})
			}
			out = append(out, res)
		}
	}
	return out, nil
}

// Begin and End delimit a component's block in BENCHMARKS.md.
func Begin(name string) string {
	return "<!-- benchdoc:" + name + " begin: rendered from benchmarks/" + name + ".txt by `make bench`; do not edit -->"
}

// End closes the block Begin opens.
func End(name string) string { return "<!-- benchdoc:" + name + " end -->" }

// Render returns the block of BENCHMARKS.md for a component's raw file,
// Begin and End lines included.
func Render(c Component, r *Raw) (string, error) {
	var b strings.Builder
	b.WriteString(Begin(c.Name) + "\n\n")
	fmt.Fprintf(&b, "Machine: %s.  \nMitigations: %s.\n\n", r.Machine, r.Mitigations)
	for _, run := range r.Runs {
		b.WriteString("    " + run.Command + "\n")
	}
	b.WriteString("\n")
	if c.Verbatim {
		for _, run := range r.Runs {
			for _, line := range run.Output {
				b.WriteString(strings.TrimRight("    "+line, " ") + "\n")
			}
		}
	} else if err := renderTable(&b, r); err != nil {
		return "", err
	}
	b.WriteString("\n" + End(c.Name))
	return b.String(), nil
}

// renderTable writes one row per benchmark (name as printed: the suffix
// is GOMAXPROCS), one column per unit, each cell the range over the runs.
func renderTable(b *strings.Builder, r *Raw) error {
	results, err := r.Results()
	if err != nil {
		return err
	}
	if len(results) == 0 {
		return fmt.Errorf("no benchmark results")
	}
	var names, units []string
	type cell struct{ lo, hi float64 }
	cells := map[string]map[string]*cell{}
	runs := map[string]int{}
	for _, res := range results {
		name := strings.TrimPrefix(res.Name, "Benchmark")
		if cells[name] == nil {
			cells[name] = map[string]*cell{}
			names = append(names, name)
		}
		runs[name]++
		for _, v := range res.Values {
			if !slices.Contains(units, v.Unit) {
				units = append(units, v.Unit)
			}
			c := cells[name][v.Unit]
			if c == nil {
				cells[name][v.Unit] = &cell{v.V, v.V}
				continue
			}
			c.lo, c.hi = math.Min(c.lo, v.V), math.Max(c.hi, v.V)
		}
	}
	b.WriteString("| benchmark | runs | " + strings.Join(units, " | ") + " |\n")
	b.WriteString("| --- | ---:" + strings.Repeat(" | ---:", len(units)) + " |\n")
	for _, name := range names {
		fmt.Fprintf(b, "| %s | %d |", name, runs[name])
		for _, u := range units {
			c := cells[name][u]
			switch {
			case c == nil:
				b.WriteString(" |")
			case Format(c.lo) == Format(c.hi):
				b.WriteString(" " + Format(c.lo) + " |")
			default:
				b.WriteString(" " + Format(c.lo) + "-" + Format(c.hi) + " |")
			}
		}
		b.WriteString("\n")
	}
	return nil
}

// Format prints a figure for reading: whole numbers from 100 up with
// thousands separators, smaller ones to three significant digits.
func Format(v float64) string {
	if math.Abs(v) >= 100 {
		s := strconv.FormatFloat(math.Round(v), 'f', 0, 64)
		neg := strings.HasPrefix(s, "-")
		s = strings.TrimPrefix(s, "-")
		var out []byte
		for i := range len(s) {
			if i > 0 && (len(s)-i)%3 == 0 {
				out = append(out, ',')
			}
			out = append(out, s[i])
		}
		if neg {
			return "-" + string(out)
		}
		return string(out)
	}
	return strconv.FormatFloat(v, 'g', 3, 64)
}

// Replace returns doc with the block of c replaced by block; an error
// when doc has no such block.
func Replace(doc string, c Component, block string) (string, error) {
	i, j, err := span(doc, c)
	if err != nil {
		return "", err
	}
	return doc[:i] + block + doc[j:], nil
}

// Block returns the block of c as it stands in doc.
func Block(doc string, c Component) (string, error) {
	i, j, err := span(doc, c)
	if err != nil {
		return "", err
	}
	return doc[i:j], nil
}

// span returns where the block of c starts and ends in doc, End included.
func span(doc string, c Component) (start, end int, err error) {
	i := strings.Index(doc, Begin(c.Name))
	j := strings.Index(doc, End(c.Name))
	if i < 0 || j < i {
		return 0, 0, fmt.Errorf("BENCHMARKS.md has no block %q ... %q", Begin(c.Name), End(c.Name))
	}
	return i, j + len(End(c.Name)), nil
}
