package scale

import (
	"context"
	"strconv"
	"strings"
	"time"

	"github.com/kubezonnet/kubezonnet/testenv"
)

// scrape reads a Prometheus text exposition and returns, per metric name,
// the sum and the maximum over its series, and per series (name{labels}
// as exposed) its value in both.
type scraped map[string]struct{ sum, max float64 }

func scrape(ctx context.Context, u string) (scraped, error) {
	body, err := testenv.HTTPGet(ctx, u)
	if err != nil {
		return nil, err
	}
	out := scraped{}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		name, rest, _ := strings.Cut(line, " ")
		series := ""
		if i := strings.IndexByte(line, '{'); i >= 0 && i < len(name) {
			name = line[:i]
			end := strings.LastIndexByte(line, '}') + 1
			series, rest = line[:end], line[end:]
		}
		fs := strings.Fields(rest)
		if len(fs) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(fs[0], 64)
		if err != nil {
			continue
		}
		for _, key := range []string{name, series} {
			if key == "" {
				continue
			}
			e, seen := out[key]
			e.sum += v
			if !seen || v > e.max {
				e.max = v
			}
			out[key] = e
		}
	}
	return out, nil
}

// receiver is the VictoriaMetrics or Prometheus the server pushes to.
type receiver struct {
	kind string // ReceiverVictoriaMetrics or ReceiverPrometheus
	url  string
}

// ready is the URL that answers 200 once the receiver accepts writes.
func (v receiver) ready() string {
	if v.kind == ReceiverPrometheus {
		return v.url + "/-/ready"
	}
	return v.url + "/health"
}

// flush makes everything received so far queryable (Prometheus' head
// answers queries as soon as it appended).
func (v receiver) flush(ctx context.Context) error {
	if v.kind != ReceiverVictoriaMetrics {
		return nil
	}
	_, err := testenv.HTTPGet(ctx, v.url+"/internal/force_flush")
	return err
}

// query runs an instant query.
func (v receiver) query(ctx context.Context, q string) ([]testenv.Sample, error) {
	return testenv.QueryAPI(ctx, v.url, q, time.Time{})
}

// scalar runs a query expected to return at most one series; none is 0.
func (v receiver) scalar(ctx context.Context, q string) (float64, error) {
	s, err := v.query(ctx, q)
	if err != nil || len(s) == 0 {
		return 0, err
	}
	return s[0].Value, nil
}
