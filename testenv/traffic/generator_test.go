package traffic_test

import (
	"flag"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/testenv/traffic"
)

// goodGenerator is a generator that validates; the cases below each break
// one field of it.
func goodGenerator() traffic.Generator {
	return traffic.Generator{
		NS:        "kzn-client",
		Src:       netip.MustParseAddrPort("10.0.0.2:65535"),
		Dst:       netip.MustParseAddr("10.0.1.2"),
		FirstPort: 1024,
		Flows:     32000,
		Rotate:    time.Second,
		Payload:   64,
		Duration:  10 * time.Second,
		CPU:       runtime.NumCPU() - 1,
	}
}

// TestGeneratorValidate: each field that cannot work is refused by name.
func TestGeneratorValidate(t *testing.T) {
	if err := goodGenerator().Validate(); err != nil {
		t.Fatalf("a good generator was refused: %v", err)
	}
	for _, tc := range []struct {
		name  string
		spoil func(*traffic.Generator)
		want  string
	}{
		{"no namespace", func(g *traffic.Generator) { g.NS = "" }, "namespace"},
		{"IPv6 source", func(g *traffic.Generator) { g.Src = netip.MustParseAddrPort("[fd00::1]:65535") }, "source"},
		{"no destination", func(g *traffic.Generator) { g.Dst = netip.Addr{} }, "destination"},
		{"no flows", func(g *traffic.Generator) { g.Flows = 0 }, "flows"},
		{"ports past 65535 when rotating", func(g *traffic.Generator) { g.FirstPort = 30000 }, "ports"},
		{"port 0", func(g *traffic.Generator) { g.FirstPort = 0 }, "ports"},
		{"negative rotate", func(g *traffic.Generator) { g.Rotate = -time.Second }, "rotate"},
		{"payload too large", func(g *traffic.Generator) { g.Payload = 70000 }, "payload"},
		{"no duration", func(g *traffic.Generator) { g.Duration = 0 }, "duration"},
		{"negative CPU", func(g *traffic.Generator) { g.CPU = -1 }, "CPU"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := goodGenerator()
			tc.spoil(&g)
			err := g.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate() = %v, want an error naming %q", err, tc.want)
			}
		})
	}
	g := goodGenerator()
	g.Rotate, g.FirstPort = 0, 30000 // without rotation the set is 32,000 ports
	if err := g.Validate(); err != nil {
		t.Errorf("32,000 ports from 30000 without rotation were refused: %v", err)
	}
}

// TestGeneratorArgs: the command line the benchmark gives cmd/udpgen
// parses back into the same generator.
func TestGeneratorArgs(t *testing.T) {
	want := goodGenerator()
	var got traffic.Generator
	fs := flag.NewFlagSet("udpgen", flag.ContinueOnError)
	got.Flags(fs)
	if err := fs.Parse(want.Args()); err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("parsed %+v from %q, want %+v", got, want.Args(), want)
	}
}
