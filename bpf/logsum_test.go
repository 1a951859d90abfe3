//go:build linux

package bpf

import (
	"math/rand/v2"
	"testing"

	"github.com/kubezonnet/kubezonnet/internal/flow"
)

// TestLogSum adds records of repeating flows, through several growths,
// and checks the sums and their order against a map, then the limit on
// new flows, and that a reset empties it for reuse.
func TestLogSum(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	key := func(i int) flowFlowKey {
		var k flowFlowKey
		k.Saddr = [16]uint8{10: 0xff, 11: 0xff, 12: 10, 15: 1}
		k.Daddr = [16]uint8{10: 0xff, 11: 0xff, 12: 10, 13: byte(i >> 16), 14: byte(i >> 8), 15: byte(i)}
		k.Port, k.Proto = 443, 6
		return k
	}
	var s logSum
	for round := range 2 {
		const flows = 5000
		want := map[flowFlowKey]flow.Counts{}
		var order []flowFlowKey
		for range 40000 {
			k := key(rng.IntN(flows))
			c := flow.Counts{Bytes: uint64(1 + rng.IntN(1500)), Packets: 1}
			fresh, added := s.add(&k, c, flows)
			if _, seen := want[k]; fresh == seen || !added {
				t.Fatalf("round %d: add(%v) = %v, %v; seen before %v", round, k.Daddr, fresh, added, seen)
			}
			if fresh {
				order = append(order, k)
			}
			w := want[k]
			w.Add(c)
			want[k] = w
		}
		if len(s.used) != len(want) {
			t.Fatalf("round %d: %d flows, want %d", round, len(s.used), len(want))
		}
		i := 0
		s.flows(func(k *flowFlowKey, c flow.Counts) {
			if *k != order[i] || c != want[*k] {
				t.Errorf("round %d: flow %d: %v %+v, want %v %+v", round, i, k.Daddr, c, order[i].Daddr, want[order[i]])
			}
			i++
		})
		// At the limit: known flows still add up, a new one is refused.
		k, c := order[0], flow.Counts{Bytes: 7, Packets: 1}
		if fresh, added := s.add(&k, c, len(s.used)); fresh || !added {
			t.Errorf("round %d: a known flow at the limit: %v, %v", round, fresh, added)
		}
		n := key(flows + 1)
		if fresh, added := s.add(&n, c, len(s.used)); fresh || added {
			t.Errorf("round %d: a new flow at the limit: %v, %v", round, fresh, added)
		}
		s.reset()
		if len(s.used) != 0 {
			t.Fatalf("round %d: %d flows after reset", round, len(s.used))
		}
		for i := range s.entries {
			if s.entries[i] != (logEntry{}) {
				t.Fatalf("round %d: entry %d in use after reset", round, i)
			}
		}
	}
}
