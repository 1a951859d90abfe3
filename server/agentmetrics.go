package server

import (
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// agentMetrics keeps the latest value of every agent self-metric that
// arrived in a batch, per node, and re-exports them as a Source: push-only
// clusters never scrape agents, so their kubezonnet_agent_* series travel
// with the data. Series of a node not heard from for ttl expire (the pusher
// then sends their stale markers); at most max are kept.
type agentMetrics struct {
	ttl time.Duration
	max int

	mu sync.Mutex
	m  map[string]*agentSeries

	refused *metrics.Counter
}

type agentSeries struct {
	labels []metrics.Label // immutable once built: the pusher may keep it
	value  float64
	seen   time.Time
}

func newAgentMetrics(ttl time.Duration, max int, reg *metrics.Registry) *agentMetrics {
	return &agentMetrics{
		ttl: ttl,
		max: max,
		m:   map[string]*agentSeries{},
		refused: reg.Counter("kubezonnet_server_agent_metrics_refused_total",
			"Agent self-metric samples not kept: invalid label names or the series limit reached."),
	}
}

// update records the metrics of a batch from node.
func (a *agentMetrics) update(node string, ms []wire.Metric, now time.Time) {
	if len(ms) == 0 {
		return
	}
	var key strings.Builder
	a.mu.Lock()
	defer a.mu.Unlock()
	for i := range ms {
		m := &ms[i]
		if !validName(m.Name) || !validLabels(m.Labels) {
			a.refused.Inc()
			continue
		}
		key.Reset()
		key.WriteString(node)
		key.WriteByte(0xff)
		key.WriteString(m.Name)
		for _, l := range m.Labels {
			key.WriteByte(0xff)
			key.WriteString(l.Name)
			key.WriteByte(0xfe)
			key.WriteString(l.Value)
		}
		s, ok := a.m[key.String()]
		if !ok {
			if len(a.m) >= a.max {
				a.refused.Inc()
				continue
			}
			s = &agentSeries{labels: agentLabels(node, m)}
			a.m[key.String()] = s
		}
		s.value, s.seen = m.Value, now
	}
}

// agentLabels builds the sorted label set of an agent metric with its node.
func agentLabels(node string, m *wire.Metric) []metrics.Label {
	ls := make([]metrics.Label, 0, 2+len(m.Labels))
	ls = append(ls, metrics.Label{Name: "__name__", Value: m.Name}, metrics.Label{Name: wire.LabelNode, Value: node})
	for _, l := range m.Labels {
		if l.Value != "" {
			ls = append(ls, metrics.Label{Name: l.Name, Value: l.Value})
		}
	}
	slices.SortFunc(ls[1:], func(a, b metrics.Label) int { return strings.Compare(a.Name, b.Name) })
	return ls
}

// AppendSeries implements remotewrite.Source.
func (a *agentMetrics) AppendSeries(dst []remotewrite.Series) []remotewrite.Series {
	a.mu.Lock()
	defer a.mu.Unlock()
	cutoff := time.Now().Add(-a.ttl)
	for k, s := range a.m {
		if s.seen.Before(cutoff) {
			delete(a.m, k)
			continue
		}
		dst = append(dst, remotewrite.Series{Labels: s.labels, Value: s.value})
	}
	return dst
}

// validName checks a Prometheus metric or label name, so that one bad
// agent cannot make the receiver refuse whole pushes.
func validName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || i > 0 && c >= '0' && c <= '9' {
			continue
		}
		return false
	}
	return true
}

func validLabels(ls []wire.Label) bool {
	for i, l := range ls {
		if !validName(l.Name) || strings.HasPrefix(l.Name, "__") || l.Name == wire.LabelNode {
			return false
		}
		if i > 0 && ls[i-1].Name >= l.Name {
			return false // unsorted or repeated
		}
	}
	return true
}
