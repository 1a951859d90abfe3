// Package metrics is kubezonnet's small self-metrics registry. Agents and
// servers both expose their metrics on /metrics for clusters that scrape,
// and push the same values by remote-write for clusters that do not, so the
// registry offers both views: Prometheus text exposition and Each, a walk
// over every series with its current value. Hot paths keep the *Counter or
// *Gauge they got at start-up and update it with one atomic operation.
package metrics

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Label is a name and value pair.
type Label struct {
	Name, Value string
}

// Counter is a monotonically increasing value.
type Counter struct{ bits atomic.Uint64 }

// Add adds v (which must not be negative).
func (c *Counter) Add(v float64) {
	for {
		old := c.bits.Load()
		if c.bits.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+v)) {
			return
		}
	}
}

// Inc adds one.
func (c *Counter) Inc() { c.Add(1) }

// Value returns the current value.
func (c *Counter) Value() float64 { return math.Float64frombits(c.bits.Load()) }

// Gauge is a value that goes up and down.
type Gauge struct{ bits atomic.Uint64 }

// Set sets the value.
func (g *Gauge) Set(v float64) { g.bits.Store(math.Float64bits(v)) }

// Add adds v, which may be negative.
func (g *Gauge) Add(v float64) {
	for {
		old := g.bits.Load()
		if g.bits.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+v)) {
			return
		}
	}
}

// Value returns the current value.
func (g *Gauge) Value() float64 { return math.Float64frombits(g.bits.Load()) }

type series struct {
	labels []Label
	value  func() float64
}

type family struct {
	name, help, typ string
	series          []*series
}

// Registry holds metric families. The zero value is not usable; use New.
type Registry struct {
	mu       sync.Mutex
	families map[string]*family
	constant []Label
}

// New returns a registry whose series all carry the constant labels (for
// example node="..." on an agent).
func New(constant ...Label) *Registry {
	return &Registry{families: map[string]*family{}, constant: constant}
}

func (r *Registry) add(name, help, typ string, labels []Label, value func() float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f, ok := r.families[name]
	if !ok {
		f = &family{name: name, help: help, typ: typ}
		r.families[name] = f
	} else if f.typ != typ {
		panic(fmt.Sprintf("metrics: %s registered as %s and %s", name, f.typ, typ))
	}
	all := append(slices.Clone(r.constant), labels...)
	slices.SortFunc(all, func(a, b Label) int { return strings.Compare(a.Name, b.Name) })
	f.series = append(f.series, &series{labels: all, value: value})
}

// Counter registers and returns a counter series.
func (r *Registry) Counter(name, help string, labels ...Label) *Counter {
	c := &Counter{}
	r.add(name, help, "counter", labels, c.Value)
	return c
}

// Gauge registers and returns a gauge series.
func (r *Registry) Gauge(name, help string, labels ...Label) *Gauge {
	g := &Gauge{}
	r.add(name, help, "gauge", labels, g.Value)
	return g
}

// GaugeFunc registers a gauge whose value is computed when read.
func (r *Registry) GaugeFunc(name, help string, fn func() float64, labels ...Label) {
	r.add(name, help, "gauge", labels, fn)
}

// CounterFunc registers a counter whose value is computed when read.
func (r *Registry) CounterFunc(name, help string, fn func() float64, labels ...Label) {
	r.add(name, help, "counter", labels, fn)
}

// sorted returns copies of the families in name order. A copy holds the
// series slice as it is under the lock: a series registered meanwhile (the
// pusher adds a counter for each new status code) appends to the family,
// never to the copy being read.
func (r *Registry) sorted() []*family {
	r.mu.Lock()
	defer r.mu.Unlock()
	fams := make([]*family, 0, len(r.families))
	for _, f := range r.families {
		c := *f
		fams = append(fams, &c)
	}
	slices.SortFunc(fams, func(a, b *family) int { return strings.Compare(a.name, b.name) })
	return fams
}

// Each calls fn for every series with its current value, families in name
// order. labels is sorted by name, excludes __name__ and must not be kept.
func (r *Registry) Each(fn func(name string, labels []Label, value float64)) {
	for _, f := range r.sorted() {
		for _, s := range f.series {
			fn(f.name, s.labels, s.value())
		}
	}
}

// WriteText writes the Prometheus text exposition format (0.0.4).
func (r *Registry) WriteText(w io.Writer) error {
	var b strings.Builder
	for _, f := range r.sorted() {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", f.name, escapeHelp(f.help), f.name, f.typ)
		for _, s := range f.series {
			b.WriteString(f.name)
			if len(s.labels) > 0 {
				b.WriteByte('{')
				for i, l := range s.labels {
					if i > 0 {
						b.WriteByte(',')
					}
					b.WriteString(l.Name)
					b.WriteString(`="`)
					b.WriteString(escapeValue(l.Value))
					b.WriteByte('"')
				}
				b.WriteByte('}')
			}
			b.WriteByte(' ')
			b.WriteString(formatValue(s.value()))
			b.WriteByte('\n')
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// Handler serves WriteText on GET.
func (r *Registry) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		_ = r.WriteText(w)
	})
}

func formatValue(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	case math.IsNaN(v):
		return "NaN"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

var (
	helpEscaper  = strings.NewReplacer(`\`, `\\`, "\n", `\n`)
	valueEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)
)

func escapeHelp(s string) string  { return helpEscaper.Replace(s) }
func escapeValue(s string) string { return valueEscaper.Replace(s) }
