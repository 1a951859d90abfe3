package traffic_test

import (
	"context"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/testutil"
	"github.com/kubezonnet/kubezonnet/testenv/traffic"
)

// TestTrafficExact runs a short profile of the benchmark, the UDP cases
// with one flow and with 32,000 new flows per second at a 1 s flush (so
// runs span several flushes and the final drain), and asserts that the
// agent reported exactly what nftables counted at node a in every run.
// Rates are logged, not asserted.
func TestTrafficExact(t *testing.T) {
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := traffic.Run(ctx, traffic.Options{
		Cases:    []string{"udp-1flow", "udp-32k-flows-per-s"},
		Runs:     1,
		Duration: 2 * time.Second,
		Output:   testutil.TestLog{T: t},
	})
	if err != nil {
		t.Fatal(err)
	}
	testutil.LogTable(t, res.WriteTable)
	for _, m := range res.Mismatches {
		t.Errorf("not exact: %s", m)
	}
	for _, c := range res.Cases {
		if len(c.With) != 1 || len(c.Empty) != 1 || len(c.Without) != 1 {
			t.Fatalf("%s: %d runs with the agent, %d with the empty program and %d without, want 1 each", c.Case.Name, len(c.With), len(c.Empty), len(c.Without))
		}
		if e := c.Empty[0]; e.ProgRuns < e.Received {
			t.Errorf("%s: the empty program ran %d times for %d datagrams received: not on their path", c.Case.Name, e.ProgRuns, e.Received)
		}
		w := c.With[0]
		if w.Reported.IsZero() || w.Received == 0 {
			t.Errorf("%s: the agent reported %+v, the server pod received %d datagrams: no traffic measured", c.Case.Name, w.Reported, w.Received)
		}
		if c.Case.Flows > 1 && w.MaxBatchFlows < 2 {
			t.Errorf("%s: the largest batch had %d flows: the generator's flows did not reach the agent", c.Case.Name, w.MaxBatchFlows)
		}
	}
}

// TestOptionsValidate: bad options are refused before anything is built.
func TestOptionsValidate(t *testing.T) {
	for _, o := range []traffic.Options{
		{Cases: []string{"nope"}},
		{Runs: -1},
		{Duration: 100 * time.Millisecond},
	} {
		if _, err := traffic.Run(context.Background(), o); err == nil {
			t.Errorf("options %+v: no error", o)
		}
	}
}

// TestRoundModes: over as many rounds as there are modes, every mode runs
// once in every place of a round.
func TestRoundModes(t *testing.T) {
	n := len(traffic.Modes)
	seen := make([]map[traffic.Mode]bool, n) // per place: the modes run there
	for i := range seen {
		seen[i] = map[traffic.Mode]bool{}
	}
	for round := range n {
		order := traffic.RoundModes(round)
		if len(order) != n {
			t.Fatalf("round %d runs %v, want each of %v once", round, order, traffic.Modes)
		}
		for place, m := range order {
			seen[place][m] = true
		}
	}
	for place, modes := range seen {
		if len(modes) != n {
			t.Errorf("place %d of a round held %v over %d rounds, want every mode", place, modes, n)
		}
	}
	if got := traffic.RoundModes(n); !slices.Equal(got, traffic.RoundModes(0)) {
		t.Errorf("round %d runs %v, round 0 %v: the rotation should repeat", n, got, traffic.RoundModes(0))
	}
}

// TestPairedRatios: each round's agent run against the empty program's
// run of the same round, never across rounds, and a round without an
// empty rate left out.
func TestPairedRatios(t *testing.T) {
	runs := func(rates ...float64) []traffic.RunResult {
		var out []traffic.RunResult
		for _, r := range rates {
			out = append(out, traffic.RunResult{Rate: r})
		}
		return out
	}
	for _, tc := range []struct {
		name        string
		empty, with []traffic.RunResult
		want        []float64
	}{
		{"rounds at different speeds", runs(100, 200, 400), runs(96, 190, 200), []float64{0.96, 0.95, 0.5}},
		{"a round without an empty rate", runs(100, 0, 50), runs(90, 80, 45), []float64{0.9, 0.9}},
		{"a round the agent did not run", runs(100, 200), runs(98), []float64{0.98}},
		{"no rounds", nil, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := traffic.CaseResult{Empty: tc.empty, With: tc.with}.PairedRatios()
			if len(got) != len(tc.want) {
				t.Fatalf("paired ratios %v, want %v", got, tc.want)
			}
			for i := range got {
				if math.Abs(got[i]-tc.want[i]) > 1e-9 {
					t.Fatalf("paired ratios %v, want %v", got, tc.want)
				}
			}
		})
	}
}
