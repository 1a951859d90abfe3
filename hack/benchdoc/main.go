// Command benchdoc runs the benchmarks of BENCHMARKS.md (`make bench`):
// for each component (internal/benchdoc.Components) it runs the commands
// one after the other, writes what they printed to
// benchmarks/<component>.txt under a line naming the machine, and renders
// the component's block of BENCHMARKS.md from that file.
//
//	go run ./hack/benchdoc                 # every component
//	go run ./hack/benchdoc -only bpf,agent # some
//	go run ./hack/benchdoc -render         # no runs: render the raw files again
//
// Run it on a quiet machine: the figures are what it prints, and the rows
// of a table are compared with each other.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	"github.com/kubezonnet/kubezonnet/internal/benchdoc"
)

func main() {
	only := flag.String("only", "", "comma-separated components to run (default: all)")
	render := flag.Bool("render", false, "render BENCHMARKS.md from the raw files without running anything")
	flag.Parse()
	if err := run(*only, *render); err != nil {
		fmt.Fprintln(os.Stderr, "benchdoc:", err)
		os.Exit(1)
	}
}

func run(only string, renderOnly bool) error {
	var want []string
	if only != "" {
		want = strings.Split(only, ",")
		for _, w := range want {
			if !slices.ContainsFunc(benchdoc.Components, func(c benchdoc.Component) bool { return c.Name == w }) {
				return fmt.Errorf("-only: no component %q", w)
			}
		}
	}
	if !renderOnly {
		machine, mitigations, err := describeMachine()
		if err != nil {
			return err
		}
		for _, c := range benchdoc.Components {
			if want != nil && !slices.Contains(want, c.Name) {
				continue
			}
			if err := runComponent(c, machine, mitigations); err != nil {
				return err
			}
		}
	}
	doc, err := os.ReadFile("BENCHMARKS.md")
	if err != nil {
		return err
	}
	text := string(doc)
	for _, c := range benchdoc.Components {
		raw, err := os.ReadFile(filepath.Join("benchmarks", c.Name+".txt"))
		if err != nil {
			return err
		}
		r, err := benchdoc.Parse(string(raw))
		if err != nil {
			return fmt.Errorf("benchmarks/%s.txt: %w", c.Name, err)
		}
		block, err := benchdoc.Render(c, r)
		if err != nil {
			return fmt.Errorf("benchmarks/%s.txt: %w", c.Name, err)
		}
		if text, err = benchdoc.Replace(text, c, block); err != nil {
			return err
		}
	}
	return os.WriteFile("BENCHMARKS.md", []byte(text), 0o644)
}

// runComponent runs a component's commands in turn, copying their output
// to the terminal as it comes, and writes the raw file.
func runComponent(c benchdoc.Component, machine, mitigations string) error {
	var raw bytes.Buffer
	raw.WriteString(benchdoc.Header(machine, mitigations))
	for _, cmd := range c.Commands {
		fmt.Fprintf(os.Stderr, "==> %s: %s\n", c.Name, cmd)
		raw.WriteString(benchdoc.CommandLine(cmd))
		var out bytes.Buffer
		sh := exec.Command("bash", "-c", cmd)
		sh.Stdout = io.MultiWriter(&out, os.Stdout)
		sh.Stderr = os.Stderr // progress, not figures
		if err := sh.Run(); err != nil {
			return fmt.Errorf("%s: %s: %w", c.Name, cmd, err)
		}
		raw.Write(out.Bytes())
	}
	if err := os.MkdirAll("benchmarks", 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join("benchmarks", c.Name+".txt"), raw.Bytes(), 0o644)
}

// describeMachine names what the figures depend on: the CPU model, the
// cores, the kernel, Go, the load when the run began, and the kernel's
// CPU vulnerability mitigations (a kernel function return costs tens of
// nanoseconds more under some of them, which moves every datapath ratio).
func describeMachine() (machine, mitigations string, err error) {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	kernel := "unknown kernel"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = "Linux " + strings.TrimSpace(string(b))
	}
	load := ""
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			load = ", load average " + f[0] + " at the start"
		}
	}
	gover, err := exec.Command("go", "env", "GOVERSION").Output()
	if err != nil {
		return "", "", fmt.Errorf("go env GOVERSION: %w", err)
	}
	machine = fmt.Sprintf("%s, %d cores, %s, %s%s", model, runtime.NumCPU(), kernel, strings.TrimSpace(string(gover)), load)

	dir := "/sys/devices/system/cpu/vulnerabilities"
	entries, err := os.ReadDir(dir)
	if err != nil {
		return machine, "not readable (" + err.Error() + ")", nil
	}
	var parts []string
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		v := strings.TrimSpace(string(b))
		if v == "Not affected" {
			continue
		}
		parts = append(parts, e.Name()+" \""+v+"\"")
	}
	if len(parts) == 0 {
		return machine, "none needed (every entry of " + dir + " says \"Not affected\")", nil
	}
	return machine, strings.Join(parts, "; "), nil
}
