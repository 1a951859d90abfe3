package benchdoc

import (
	"strings"
	"testing"
)

func TestFormat(t *testing.T) {
	for _, tc := range []struct {
		v    float64
		want string
	}{
		{0, "0"},
		{0.0007, "0.0007"},
		{19.59, "19.6"},
		{99.94, "99.9"},
		{100, "100"},
		{1234.5, "1,235"},
		{2784967, "2,784,967"},
		{-45000, "-45,000"},
	} {
		if got := Format(tc.v); got != tc.want {
			t.Errorf("Format(%v) = %q, want %q", tc.v, got, tc.want)
		}
	}
}

const sample = `# raw output
# machine: AMD EPYC, 2 cores, Linux 6.18, go1.26.8
# mitigations: spec_rstack_overflow "Vulnerable: No microcode"
# command: go test -bench X ./agent/
goos: linux
pkg: github.com/kubezonnet/kubezonnet/agent
cpu: AMD EPYC
BenchmarkEncodeFlush-2   	      20	  15800000 ns/op	      19.59 wire-bytes/flow	 2340000 B/op	       4 allocs/op
BenchmarkEncodeFlush-2   	      20	  18200000 ns/op	      19.59 wire-bytes/flow	 2340000 B/op	       4 allocs/op
BenchmarkEncodeFlush-1   	      20	  30200000 ns/op	      19.59 wire-bytes/flow	 2190000 B/op	       2 allocs/op
    bench_test.go:40: a log line of the benchmark
PASS
ok  	github.com/kubezonnet/kubezonnet/agent	12.3s
# command: go test -bench Y ./internal/wire/
pkg: github.com/kubezonnet/kubezonnet/internal/wire
BenchmarkDecode/ipv4-2 	 1000	 270.5 ns/op
`

func TestRender(t *testing.T) {
	r, err := Parse(sample)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Runs) != 2 || r.Machine != "AMD EPYC, 2 cores, Linux 6.18, go1.26.8" {
		t.Fatalf("parsed %d runs, machine %q", len(r.Runs), r.Machine)
	}
	res, err := r.Results()
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 4 || res[3].Pkg != "github.com/kubezonnet/kubezonnet/internal/wire" || res[0].Iters != 20 {
		t.Fatalf("results %+v", res)
	}
	c := Component{Name: "agent", Commands: []string{"go test -bench X ./agent/", "go test -bench Y ./internal/wire/"}}
	block, err := Render(c, r)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		Begin("agent"),
		"Machine: AMD EPYC, 2 cores, Linux 6.18, go1.26.8.",
		`Mitigations: spec_rstack_overflow "Vulnerable: No microcode".`,
		"    go test -bench X ./agent/\n    go test -bench Y ./internal/wire/\n",
		"| benchmark | runs | ns/op | wire-bytes/flow | B/op | allocs/op |",
		"| EncodeFlush-2 | 2 | 15,800,000-18,200,000 | 19.6 | 2,340,000 | 4 |",
		"| EncodeFlush-1 | 1 | 30,200,000 | 19.6 | 2,190,000 | 2 |",
		"| Decode/ipv4-2 | 1 | 271 | | | |",
		End("agent"),
	} {
		if !strings.Contains(block, want) {
			t.Errorf("rendered block lacks %q:\n%s", want, block)
		}
	}

	doc := "intro\n" + Begin("agent") + "\nold\n" + End("agent") + "\nafter\n"
	got, err := Replace(doc, c, block)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := Block(got, c); err != nil || b != block || !strings.HasPrefix(got, "intro\n") || !strings.HasSuffix(got, "\nafter\n") {
		t.Errorf("Replace/Block round trip: %q (%v)", got, err)
	}
	if _, err := Replace("no block", c, block); err == nil {
		t.Error("Replace without a block: no error")
	}
}

func TestParseErrors(t *testing.T) {
	for name, text := range map[string]string{
		"no machine":            "# command: x\nBenchmarkA-2 1 1 ns/op\n",
		"output before command": "# machine: m\nBenchmarkA-2 1 1 ns/op\n",
	} {
		if _, err := Parse(text); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
