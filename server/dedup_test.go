package server

import (
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
)

func TestDedupBounds(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	d := newDedup(time.Minute, 2, metrics.New())
	steps := []struct {
		node, inc string
		seq       uint64
		after     time.Duration
		want      bool
	}{
		{"a", "1", 1, 0, true},
		{"a", "1", 1, 0, false}, // retry
		{"a", "1", 2, 0, true},
		{"b", "1", 5, 0, true},  // any first seq is accepted
		{"b", "1", 4, 0, false}, // below the highest
		{"a", "2", 1, 0, true},  // a's new incarnation evicts a/1, the least recently seen
		{"a", "1", 2, 0, true},  // a/1 forgotten: its seq is accepted again (evicts b/1)
		{"a", "2", 1, 0, false},
		{"a", "2", 1, 2 * time.Minute, true}, // expired after the TTL
	}
	for i, s := range steps {
		now = now.Add(s.after)
		if _, got := d.claim(s.node, s.inc, s.seq, now); got != s.want {
			t.Errorf("step %d %+v: claim = %v, want %v", i, s, got, s.want)
		}
	}
	if v := d.evicted.Value(); v != 2 {
		t.Errorf("evicted = %v, want 2", v)
	}
	if v := d.duplicates.Value(); v != 3 {
		t.Errorf("duplicates = %v, want 3", v)
	}
}
