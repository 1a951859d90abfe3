package remotewrite

import (
	"slices"
	"testing"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
)

func TestRegistrySource(t *testing.T) {
	reg := metrics.New(metrics.Label{Name: "node", Value: "n1"})
	c := reg.Counter("kubezonnet_x_total", "x", metrics.Label{Name: "reason", Value: "full"})
	c.Add(3)
	g := reg.Gauge("kubezonnet_a", "a")
	g.Set(-2)
	got := RegistrySource(reg).AppendSeries([]Series{{Value: 99}})
	if len(got) != 3 || got[0].Value != 99 {
		t.Fatalf("AppendSeries did not append to dst: %+v", got)
	}
	want := []Series{
		{Labels: []metrics.Label{{Name: "__name__", Value: "kubezonnet_a"}, {Name: "node", Value: "n1"}}, Value: -2},
		{Labels: []metrics.Label{{Name: "__name__", Value: "kubezonnet_x_total"}, {Name: "node", Value: "n1"}, {Name: "reason", Value: "full"}}, Value: 3},
	}
	for i, w := range want {
		if !slices.Equal(got[i+1].Labels, w.Labels) || got[i+1].Value != w.Value {
			t.Errorf("series %d = %+v, want %+v", i, got[i+1], w)
		}
	}
	// Returned series are immutable: a later snapshot must not change them.
	c.Add(1)
	RegistrySource(reg).AppendSeries(nil)
	if got[2].Value != 3 {
		t.Errorf("an earlier snapshot changed to %v", got[2].Value)
	}
}
