package metrics

import (
	"strconv"
	"strings"
	"testing"
)

func TestWriteText(t *testing.T) {
	r := New(Label{"node", "n1"})
	c := r.Counter("kubezonnet_agent_sends_total", "Requests sent.", Label{"result", "ok"})
	f := r.Counter("kubezonnet_agent_sends_total", "Requests sent.", Label{"result", "failed"})
	g := r.Gauge("kubezonnet_agent_buffered_flows", "Flows waiting.")
	c.Add(3)
	f.Inc()
	g.Set(-2.5)
	var b strings.Builder
	if err := r.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	want := `# HELP kubezonnet_agent_buffered_flows Flows waiting.
# TYPE kubezonnet_agent_buffered_flows gauge
kubezonnet_agent_buffered_flows{node="n1"} -2.5
# HELP kubezonnet_agent_sends_total Requests sent.
# TYPE kubezonnet_agent_sends_total counter
kubezonnet_agent_sends_total{node="n1",result="ok"} 3
kubezonnet_agent_sends_total{node="n1",result="failed"} 1
`
	if b.String() != want {
		t.Errorf("got:\n%s\nwant:\n%s", b.String(), want)
	}
	var n int
	r.Each(func(name string, labels []Label, v float64) { n++ })
	if n != 3 {
		t.Errorf("Each visited %d series, want 3", n)
	}
}

// Reading the registry while series are registered (the pusher adds a
// counter per new status code while a push reads every series) is safe:
// go test -race fails on this test without the copy in sorted.
func TestEachWhileRegistering(t *testing.T) {
	r := New()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 200 {
			r.Counter("requests_total", "Requests.", Label{Name: "code", Value: strconv.Itoa(i)})
		}
	}()
	for {
		n := 0
		r.Each(func(string, []Label, float64) { n++ })
		select {
		case <-done:
			n = 0
			r.Each(func(string, []Label, float64) { n++ })
			if n != 200 {
				t.Fatalf("%d series, want 200", n)
			}
			return
		default:
		}
	}
}
