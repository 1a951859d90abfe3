package remotewrite

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/golang/snappy"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/prometheus/prometheus/prompb"
)

// modelKey is the series a label set is to the receiver, computed without
// the pusher's code: series labels merged with the external labels (which
// yield) and HA labels (which win), empty values dropped, sorted by name
// with __name__ first.
func modelKey(ls []metrics.Label, ext, ha []metrics.Label) string {
	m := map[string]string{}
	for _, l := range ls {
		m[l.Name] = l.Value
	}
	for _, l := range ext {
		if _, ok := m[l.Name]; !ok {
			m[l.Name] = l.Value
		}
	}
	for _, l := range ha {
		m[l.Name] = l.Value
	}
	var names []string
	for n, v := range m {
		if v != "" {
			names = append(names, n)
		}
	}
	slices.SortFunc(names, func(a, b string) int {
		switch {
		case a == b:
			return 0
		case a == "__name__":
			return -1
		case b == "__name__":
			return 1
		}
		return strings.Compare(a, b)
	})
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "%s=%q,", n, m[n])
	}
	return b.String()
}

// decodeRequest decodes a compressed WriteRequest with prompb.
func decodeRequest(t *testing.T, body []byte) []prompb.TimeSeries {
	t.Helper()
	raw, err := snappy.Decode(nil, body)
	if err != nil {
		t.Fatalf("snappy: %v", err)
	}
	var wr prompb.WriteRequest
	if err := wr.Unmarshal(raw); err != nil {
		t.Fatalf("prompb: %v", err)
	}
	return wr.Timeseries
}

// decodeSnapshot returns the samples of every series of a snapshot's
// requests by key, failing on a series sent twice, a request over the size
// limit, a series in another shard than in earlier snapshots, or a
// fallback that is not its request without the zero samples.
func decodeSnapshot(t *testing.T, reqs [][]request, maxPerReq int, shardOf map[string]int) map[string][]prompb.Sample {
	t.Helper()
	got := map[string][]prompb.Sample{}
	for sh, rs := range reqs {
		for _, r := range rs {
			series := decodeRequest(t, r.body)
			if len(series) != r.samples || r.samples > maxPerReq {
				t.Errorf("request with %d series (counted %d), max %d", len(series), r.samples, maxPerReq)
			}
			var fallback []prompb.TimeSeries
			if r.fallback != nil {
				fallback = decodeRequest(t, r.fallback)
				if len(fallback) != len(series) {
					t.Fatalf("fallback with %d series, request with %d", len(fallback), len(series))
				}
			}
			zeros := 0
			for i, ts := range series {
				var b strings.Builder
				for _, l := range ts.Labels {
					fmt.Fprintf(&b, "%s=%q,", l.Name, l.Value)
				}
				k := b.String()
				if _, dup := got[k]; dup {
					t.Errorf("series %s twice in one snapshot", k)
				}
				if n := len(ts.Samples); n != 1 && n != 2 {
					t.Fatalf("series %s: %d samples", k, n)
				}
				zeros += len(ts.Samples) - 1
				got[k] = ts.Samples
				if s, ok := shardOf[k]; ok && s != sh {
					t.Errorf("series %s moved from shard %d to %d", k, s, sh)
				}
				shardOf[k] = sh
				if fallback != nil {
					f := fallback[i]
					if labelString(f.Labels) != labelString(ts.Labels) || len(f.Samples) != 1 ||
						!sameSample(f.Samples[0], ts.Samples[len(ts.Samples)-1]) {
						t.Errorf("fallback has %s %v for %s %v", labelString(f.Labels), f.Samples, k, ts.Samples)
					}
				}
			}
			if zeros != r.zeros || (zeros > 0) != (r.fallback != nil) {
				t.Errorf("request with %d zeros counts %d, fallback %d bytes", zeros, r.zeros, len(r.fallback))
			}
		}
	}
	return got
}

// TestSnapshotMatchesModel drives snapshots through random pushes that
// exercise every path of the series table (label slices kept, rebuilt with
// the same labels, returned twice, copied into a duplicate, cut to a
// shorter prefix of the same array; series appearing, vanishing and coming
// back; order kept, rotated or shuffled; encodings cached, partly cached or
// not at all; compaction) and checks each one against a plain model: every
// distinct series once with the value of its first occurrence, and a stale
// marker for each series of the previous snapshot that is gone. Series
// carry random creation times; the model's rule for zero samples is that a
// series not in the previous snapshot gets one when its first occurrence's
// Created is not 0 and before the stamp, and the fallback of every request
// is the request without them.
func TestSnapshotMatchesModel(t *testing.T) {
	ext := []metrics.Label{{Name: "cluster", Value: "prod"}, {Name: "zone", Value: "z0"}}
	ha := []metrics.Label{{Name: "__replica__", Value: "r1"}, {Name: "region", Value: "eu"}}
	for _, tc := range []struct {
		name string
		max  int
		ha   bool
	}{
		{"cached", 1 << 30, false},
		{"partly cached", 6000, true},
		{"uncached", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(1, uint64(tc.max)))
			cfg := testConfig()
			cfg.Shards = 3
			cfg.MaxSeriesPerRequest = 7
			cfg.ExternalLabels = ext
			var haLabels []metrics.Label
			if tc.ha {
				cfg.HA = HAConfig{Cluster: "eu", Replica: "r1", ClusterLabel: "region", ReplicaLabel: "__replica__"}
				haLabels = ha
			}
			reg := metrics.New()
			p, err := NewPusher(cfg, nil, reg, nil)
			if err != nil {
				t.Fatal(err)
			}
			p.table.max = tc.max
			p.table.minDead, p.table.minEntries = 1, 8

			// A pool of label sets; some differ only by an empty label
			// (the same series to a receiver), one has no labels at all.
			const pool = 60
			content := func(i int) []metrics.Label {
				if i == pool-1 {
					return nil
				}
				ls := []metrics.Label{{Name: "__name__", Value: fmt.Sprintf("m%d", i%3)}}
				if i%5 == 0 {
					ls = append(ls, metrics.Label{Name: "a", Value: ""})
				}
				ls = append(ls, metrics.Label{Name: "b", Value: fmt.Sprint(i / 2 * 2)}) // i and i+1 share b
				if i%2 == 1 && i%5 != 0 {
					ls = append(ls, metrics.Label{Name: "c", Value: "odd"})
				}
				if i%7 == 0 {
					ls = append(ls, metrics.Label{Name: "cluster", Value: "own"})
				}
				if i%11 == 0 {
					ls = append(ls, metrics.Label{Name: "region", Value: "mine"})
				}
				ls = append(ls, metrics.Label{Name: "x", Value: strings.Repeat("v", rng.IntN(3)*70)})
				return ls
			}
			slicesOf := make([][]metrics.Label, pool)
			for i := range slicesOf {
				slicesOf[i] = content(i)
			}
			shardOf := map[string]int{}
			prev := map[string]bool{}
			var wantDup, wantStale, wantZeros float64
			var order []int
			for push := range 300 {
				ts := int64(1000 + push)
				created := func() int64 {
					switch rng.IntN(8) {
					case 0, 1, 2:
						return 0
					case 3:
						return ts
					case 4:
						return ts + 1
					case 5:
						return -int64(rng.IntN(1 << 20)) // before the epoch: a 10-byte varint
					}
					return ts - 1 - int64(rng.IntN(1<<rng.IntN(40)))
				}
				// Which series exist this push, and their slices.
				if push == 0 || rng.IntN(4) == 0 {
					order = order[:0]
					for i := range pool {
						if rng.IntN(10) < 7 {
							order = append(order, i)
						}
					}
				}
				switch rng.IntN(4) {
				case 0:
					rng.Shuffle(len(order), func(a, b int) { order[a], order[b] = order[b], order[a] })
				case 1:
					if len(order) > 0 {
						k := rng.IntN(len(order))
						order = append(order[k:], order[:k]...)
					}
				}
				var series []Series
				for _, i := range order {
					switch rng.IntN(20) {
					case 0: // rebuilt with the same labels
						slicesOf[i] = slices.Clone(slicesOf[i])
					case 1: // replaced by another series
						slicesOf[i] = content(i)
					}
					ls := slicesOf[i]
					series = append(series, Series{Labels: ls, Value: float64(push*1000 + i), Created: created()})
					switch rng.IntN(30) {
					case 0:
						series = append(series, Series{Labels: ls, Value: -1, Created: created()}) // same slice again
					case 1:
						series = append(series, Series{Labels: slices.Clone(ls), Value: -2, Created: created()}) // a copy
					case 2:
						if len(ls) > 2 { // a shorter series in the same array
							series = append(series, Series{Labels: ls[:2], Value: -3, Created: created()})
						}
					}
				}
				p.sources = []Source{SourceFunc(func(dst []Series) []Series { return append(dst, series...) })}

				want := map[string][]prompb.Sample{}
				cur := map[string]bool{}
				for _, s := range series {
					k := modelKey(s.Labels, ext, haLabels)
					if cur[k] {
						wantDup++
						continue
					}
					cur[k] = true
					want[k] = []prompb.Sample{{Value: s.Value, Timestamp: ts}}
					if !prev[k] && s.Created != 0 && s.Created < ts {
						want[k] = append([]prompb.Sample{{Timestamp: s.Created}}, want[k]...)
						wantZeros++
					}
				}
				for k := range prev {
					if !cur[k] {
						want[k] = []prompb.Sample{{Value: StaleNaN, Timestamp: ts}}
						wantStale++
					}
				}
				prev = cur

				got := decodeSnapshot(t, p.snapshot(ts), cfg.MaxSeriesPerRequest, shardOf)
				for k, w := range want {
					g, ok := got[k]
					switch {
					case !ok:
						t.Errorf("push %d: %s missing", push, k)
					case !slices.EqualFunc(g, w, sameSample):
						t.Errorf("push %d: %s = %v, want %v", push, k, g, w)
					}
				}
				for k := range got {
					if _, ok := want[k]; !ok {
						t.Errorf("push %d: unexpected %s", push, k)
					}
				}
				if t.Failed() {
					t.FailNow()
				}
			}
			if v := metricValue(t, reg, "kubezonnet_server_remote_write_duplicate_series_total"); v != wantDup {
				t.Errorf("duplicates = %v, want %v", v, wantDup)
			}
			if v := metricValue(t, reg, "kubezonnet_server_remote_write_stale_markers_total"); v != wantStale {
				t.Errorf("stale markers = %v, want %v", v, wantStale)
			}
			if wantZeros == 0 {
				t.Error("no zero sample in 300 pushes: the test lost its coverage")
			}
			// Nothing outlives its series: entries and arena hold only the
			// last snapshot.
			tb := &p.table
			live, arena := 0, 0
			for _, e := range tb.entries {
				if e.gen != 0 {
					live++
					if e.cached {
						arena += int(e.n)
					}
				}
			}
			if live != len(prev) || len(tb.byHash) > live || len(tb.byID) > live {
				t.Errorf("table holds %d entries (%d by hash, %d by identity) for %d series", live, len(tb.byHash), len(tb.byID), len(prev))
			}
			if len(tb.arena) != arena+tb.dead || len(tb.arena) > tc.max {
				t.Errorf("arena %d bytes, %d live + %d dead, max %d", len(tb.arena), arena, tb.dead, tc.max)
			}
		})
	}
}

// TestSnapshotEncodingMatchesBuilder checks the bytes of a snapshot's
// series, cached and not, against SeriesBuilder, the codec the tests check
// against prompb.
func TestSnapshotEncodingMatchesBuilder(t *testing.T) {
	for _, limit := range []int{1 << 30, 0} {
		cfg := testConfig()
		cfg.Shards = 1
		cfg.ExternalLabels = []metrics.Label{{Name: "cluster", Value: "prod"}}
		ls := podPair("kubezonnet_pod_pair_bytes_total", strings.Repeat("p", 200), "db-0") // two-byte lengths
		src := SourceFunc(func(dst []Series) []Series { return append(dst, Series{Labels: ls, Value: 42.5}) })
		p, err := NewPusher(cfg, []Source{src}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		p.table.max = limit
		var sb SeriesBuilder
		p.appendLabels(&sb, ls)
		for _, ts := range []int64{1, 1 << 40, 0} {
			want := sb
			want.body = slices.Clone(sb.body)
			want.Sample(42.5, ts)
			reqs := p.snapshot(ts)
			raw, err := snappy.Decode(nil, reqs[0][0].body)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(raw, want.AppendTo(nil)) {
				t.Errorf("cache limit %d, stamp %d: snapshot encodes the series differently from SeriesBuilder", limit, ts)
			}
		}
	}
}

// TestSnapshotZeroEncodingMatchesBuilder checks the bytes of a request
// with created-timestamp zeros, and of its fallback, against SeriesBuilder:
// series with and without a zero side by side, cached and not, with label
// sizes on both sides of a series length that needs a two-byte varint with
// the zero and one byte without it.
func TestSnapshotZeroEncodingMatchesBuilder(t *testing.T) {
	const ts = 1_700_000_000_000
	for _, limit := range []int{1 << 30, 0} {
		for _, created := range []int64{ts - 1, 1, -1} {
			for podLen := 1; podLen < 200; podLen++ {
				cfg := testConfig()
				cfg.Shards = 1
				cfg.ExternalLabels = []metrics.Label{{Name: "cluster", Value: "prod"}}
				var series []Series
				for i, c := range []int64{created, 0, created} {
					ls := []metrics.Label{
						{Name: "__name__", Value: "kubezonnet_pod_pair_bytes_total"},
						{Name: "src_pod", Value: fmt.Sprintf("%d%s", i, strings.Repeat("p", podLen))},
					}
					series = append(series, Series{Labels: ls, Value: float64(i) + 0.5, Created: c})
				}
				src := SourceFunc(func(dst []Series) []Series { return append(dst, series...) })
				p, err := NewPusher(cfg, []Source{src}, nil, nil)
				if err != nil {
					t.Fatal(err)
				}
				p.table.max = limit
				var body, fallback []byte
				for _, s := range series {
					var sb SeriesBuilder
					p.appendLabels(&sb, s.Labels)
					plain := sb
					plain.body = slices.Clone(sb.body)
					plain.Sample(s.Value, ts)
					fallback = plain.AppendTo(fallback)
					if s.Created != 0 {
						sb.Sample(0, s.Created)
					}
					sb.Sample(s.Value, ts)
					body = sb.AppendTo(body)
				}
				reqs := p.snapshot(ts)
				if len(reqs[0]) != 1 {
					t.Fatalf("%d requests, want 1", len(reqs[0]))
				}
				r := reqs[0][0]
				gotBody, err := snappy.Decode(nil, r.body)
				if err != nil {
					t.Fatal(err)
				}
				gotFallback, err := snappy.Decode(nil, r.fallback)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(gotBody, body) || !bytes.Equal(gotFallback, fallback) || r.zeros != 2 || r.samples != 3 {
					t.Fatalf("cache limit %d, created %d, pod name of %d bytes: request (%d zeros, %d samples) or fallback differs from SeriesBuilder's",
						limit, created, podLen, r.zeros, r.samples)
				}
			}
		}
	}
}

// TestSnapshotRebuiltSlices: a source that builds new label slices at
// every push (as RegistrySource does) keeps its entries, gets no stale
// markers, and its new slices become the identities, so that nothing
// grows from push to push.
func TestSnapshotRebuiltSlices(t *testing.T) {
	reg := metrics.New()
	for i := range 20 {
		reg.Counter("kubezonnet_test_total", "t", metrics.Label{Name: "i", Value: fmt.Sprint(i)}).Add(float64(i))
	}
	var last []Series
	src := SourceFunc(func(dst []Series) []Series {
		n := len(dst)
		dst = RegistrySource(reg).AppendSeries(dst)
		last = dst[n:]
		return dst
	})
	self := metrics.New()
	p, err := NewPusher(testConfig(), []Source{src}, self, nil)
	if err != nil {
		t.Fatal(err)
	}
	p.snapshot(1)
	entries, arena := len(p.table.entries), len(p.table.arena)
	for ts := int64(2); ts < 10; ts++ {
		p.snapshot(ts)
		for _, s := range last {
			i, ok := p.table.byID[&s.Labels[0]]
			if !ok || &p.table.entries[i].labels[0] != &s.Labels[0] {
				t.Fatalf("push %d: series %v not known by its new label slice", ts, s.Labels)
			}
		}
	}
	if len(p.table.entries) != entries || len(p.table.arena) != arena || len(p.table.byID) != len(last) {
		t.Errorf("table grew: %d entries (was %d), %d arena bytes (was %d), %d identities for %d series",
			len(p.table.entries), entries, len(p.table.arena), arena, len(p.table.byID), len(last))
	}
	if v := metricValue(t, self, "kubezonnet_server_remote_write_stale_markers_total"); v != 0 {
		t.Errorf("%v stale markers for series that only got new label slices", v)
	}
}
