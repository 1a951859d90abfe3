package series_test

// Captures encoded through a real remotewrite.Pusher to a receiver on
// 127.0.0.1 that decodes every request: what reaches the receiver is what
// the package promises (zeros, twins, stale markers, label order), with
// the pusher's own merging of external labels in between.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
	"github.com/kubezonnet/kubezonnet/server/series"
)

// storeSource is how the server hands a store to the pusher, cut down to
// what the tests need: the lock its owner holds around every store call,
// a capture started under it and walked a chunk at a time under it, and
// the Encode without it. delivered is what it
// passes Capture, set by the test (not fed from the pusher's watermark,
// so that a series sent once must get no second zero for being sent,
// not for being delivered); watermark is what the pusher reports.
type storeSource struct {
	mu        sync.Mutex
	s         *series.Store
	stamps    []int64 // of the snapshots captured, guarded by mu
	delivered atomic.Int64
	watermark atomic.Int64
}

func (src *storeSource) AppendSeries(dst []remotewrite.Series) []remotewrite.Series { return dst }

func (src *storeSource) EncodeSnapshot(ts int64, w *remotewrite.SnapshotWriter) {
	src.mu.Lock()
	c, _ := src.s.StartCapture(ts, src.delivered.Load())
	src.stamps = append(src.stamps, ts)
	src.mu.Unlock()
	c.Walk(&src.mu)
	c.Encode(w)
}

// do calls f with the store under the owner's lock. A t.Fatal in f
// unlocks it on its way out, before the cleanup's flush captures.
func (src *storeSource) do(f func(s *series.Store)) {
	src.mu.Lock()
	defer src.mu.Unlock()
	f(src.s)
}

// lastStamp returns the stamp of the last snapshot captured.
func (src *storeSource) lastStamp() int64 {
	src.mu.Lock()
	defer src.mu.Unlock()
	return src.stamps[len(src.stamps)-1]
}

// receiver is a remote-write endpoint that decodes every request and
// keeps the samples of each series, by its labels in the order they came
// ("name=value,..."), answering 204.
type receiver struct {
	srv *httptest.Server

	mu  sync.Mutex
	got map[string][]remotewrite.Sample
	err error
}

func newReceiver(t *testing.T) *receiver {
	t.Helper()
	r := &receiver{got: map[string][]remotewrite.Sample{}}
	r.srv = httptest.NewServer(http.HandlerFunc(r.serve)) // on 127.0.0.1
	t.Cleanup(r.srv.Close)
	return r
}

func (r *receiver) serve(w http.ResponseWriter, req *http.Request) {
	fail := func(err error) {
		r.mu.Lock()
		r.err = errors.Join(r.err, err)
		r.mu.Unlock()
		http.Error(w, err.Error(), http.StatusBadRequest)
	}
	body, _, err := testutil.ReadSnappy(req.Body)
	if err != nil {
		fail(err)
		return
	}
	got := map[string][]remotewrite.Sample{}
	var rs remotewrite.RawSeries
	err = remotewrite.WalkSeries(body, &rs, func(s *remotewrite.RawSeries) error {
		var names []string
		var b strings.Builder
		for i, l := range s.Labels {
			if i > 0 {
				b.WriteByte(',')
			}
			names = append(names, string(l.Name))
			fmt.Fprintf(&b, "%s=%s", l.Name, l.Value)
		}
		// The remote-write spec: labels sorted by name; __name__ sorts
		// first anyway.
		if len(names) == 0 || names[0] != "__name__" || !slices.IsSorted(names) || len(slices.Compact(slices.Clone(names))) != len(names) {
			return fmt.Errorf("series %s: labels not __name__ then sorted by name", b.String())
		}
		got[b.String()] = append(got[b.String()], s.Samples...)
		return nil
	})
	if err != nil {
		fail(err)
		return
	}
	r.mu.Lock()
	for k, v := range got {
		r.got[k] = append(r.got[k], v...)
	}
	r.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// take returns what the receiver got since the last take.
func (r *receiver) take(t *testing.T) map[string][]remotewrite.Sample {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err != nil {
		t.Fatalf("receiver: %v", r.err)
	}
	got := r.got
	r.got = map[string][]remotewrite.Sample{}
	return got
}

// newTestPusher returns a pusher of src to rcv with cfg's settings,
// reporting its watermark to src, flushed when the test ends.
func newTestPusher(t *testing.T, cfg remotewrite.PusherConfig, src *storeSource, rcv *receiver) *remotewrite.Pusher {
	t.Helper()
	cfg.Endpoints = []remotewrite.EndpointConfig{{URL: rcv.srv.URL + "/api/v1/write"}}
	p, err := remotewrite.NewPusher(cfg, []remotewrite.Source{src}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	p.OnDelivered(func(ts int64) { src.watermark.Store(ts) })
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = p.Flush(ctx)
	})
	return p
}

// push pushes one snapshot, waits for its delivery and returns what the
// receiver got and the snapshot's stamp.
func push(t *testing.T, p *remotewrite.Pusher, src *storeSource, rcv *receiver) (map[string][]remotewrite.Sample, int64) {
	t.Helper()
	p.Push()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	return rcv.take(t), src.lastStamp()
}

// afterMilli waits until the clock is past ms: the pusher stamps a
// snapshot with the clock (or one more than the last stamp), and a zero
// needs a stamp after it.
func afterMilli(t *testing.T, ms int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().UnixMilli() <= ms {
		if time.Now().After(deadline) {
			t.Fatalf("clock not past %d", ms)
		}
		time.Sleep(time.Millisecond)
	}
}

// stale is the expectation of a stale marker.
var stale = math.Float64frombits(0x7ff0000000000002)

// sameSamples compares got with want, where a stale marker stands for
// any stale marker.
func sameSamples(got, want []remotewrite.Sample) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range want {
		if got[i].Timestamp != want[i].Timestamp {
			return false
		}
		if remotewrite.IsStaleNaN(want[i].Value) != remotewrite.IsStaleNaN(got[i].Value) {
			return false
		}
		if !remotewrite.IsStaleNaN(want[i].Value) && got[i].Value != want[i].Value {
			return false
		}
	}
	return true
}

// expect checks that got holds exactly want: every series with its
// samples, and no other.
func expect(t *testing.T, push string, got, want map[string][]remotewrite.Sample) {
	t.Helper()
	for k, w := range want {
		if g, ok := got[k]; !ok {
			t.Errorf("%s: no series %s, want samples %v", push, k, w)
		} else if !sameSamples(g, w) {
			t.Errorf("%s: series %s got samples %v, want %v", push, k, g, w)
		}
	}
	for k, g := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("%s: unexpected series %s with samples %v", push, k, g)
		}
	}
}

func TestCaptureThroughPusher(t *testing.T) {
	src := &storeSource{s: series.New()}
	rcv := newReceiver(t)
	cfg := remotewrite.DefaultPusherConfig()
	// cluster and region sort between the series' labels; src_zone is a
	// series label of some series, which keep their own value.
	cfg.ExternalLabels = []metrics.Label{{Name: "src_zone", Value: "ext"}, {Name: "region", Value: "r1"}, {Name: "cluster", Value: "c1"}}
	p := newTestPusher(t, cfg, src, rcv)

	now := time.Now().UnixMilli()
	created := now - 60_000
	nowNS := time.Now().UnixNano()
	pair := lbl("__name__", "kzn_pair_bytes_total", "dst_zone", "b", "src_zone", "a")
	zone := lbl("__name__", "kzn_zone_bytes_total", "dst_zone", "b")
	// Received label sets: externals merged in by name, a series label
	// winning over an external one.
	const (
		pairBytes   = "__name__=kzn_pair_bytes_total,cluster=c1,dst_zone=b,region=r1,src_zone=a"
		pairPackets = "__name__=kzn_pair_packets_total,cluster=c1,dst_zone=b,region=r1,src_zone=a"
		zoneBytes   = "__name__=kzn_zone_bytes_total,cluster=c1,dst_zone=b,region=r1,src_zone=ext"
		oldBytes    = "__name__=kzn_old_bytes_total,cluster=c1,region=r1,src_zone=ext"
		maybeBytes  = "__name__=kzn_maybe_bytes_total,cluster=c1,region=r1,src_zone=ext"
	)
	// Restored from persisted state: one first pushed before the
	// watermark persisted with them (the receivers have it, no zero), one
	// after (a zero sent apart, which this receiver takes).
	old, maybe := lbl("__name__", "kzn_old_bytes_total"), lbl("__name__", "kzn_maybe_bytes_total")
	src.delivered.Store(now - 30_000)

	var a, z uint32 // the pair's ref, the zone series'
	src.do(func(s *series.Store) {
		s.Install(0, 3, old, "", created, s.Hash(old))
		s.Restore(0, 70, 0, nowNS, now-40_000)
		s.Install(1, 3, maybe, "", created, s.Hash(maybe))
		s.Restore(1, 80, 0, nowNS, now-20_000)
		s.Rebuild()
		a = s.Create(1, pair, "kzn_pair_packets_total", created, nowNS)
		s.Add(a, 100, 3, nowNS)
		z = s.Create(2, zone, "", created, nowNS)
		s.Add(z, 50, 0, nowNS)
	})

	got, ts1 := push(t, p, src, rcv)
	expect(t, "push 1", got, map[string][]remotewrite.Sample{
		pairBytes:   {{Value: 0, Timestamp: created}, {Value: 100, Timestamp: ts1}},
		pairPackets: {{Value: 0, Timestamp: created}, {Value: 3, Timestamp: ts1}},
		zoneBytes:   {{Value: 0, Timestamp: created}, {Value: 50, Timestamp: ts1}},
		oldBytes:    {{Value: 70, Timestamp: ts1}},
		maybeBytes:  {{Value: 0, Timestamp: created}, {Value: 80, Timestamp: ts1}},
	})

	src.do(func(s *series.Store) {
		s.Add(a, 20, 1, nowNS+1)
	})
	got, ts2 := push(t, p, src, rcv)
	expect(t, "push 2: no zeros", got, map[string][]remotewrite.Sample{
		pairBytes:   {{Value: 120, Timestamp: ts2}},
		pairPackets: {{Value: 4, Timestamp: ts2}},
		zoneBytes:   {{Value: 50, Timestamp: ts2}},
		oldBytes:    {{Value: 70, Timestamp: ts2}},
		maybeBytes:  {{Value: 80, Timestamp: ts2}},
	})

	// The pair idles out; the rest is updated.
	src.do(func(s *series.Store) {
		for _, ref := range []uint32{0, 1, z} {
			s.Add(ref, 0, 0, nowNS+10)
		}
		if dead := s.Expire(nowNS+5, nil); !slices.Equal(dead, []uint32{a}) {
			t.Fatalf("Expire = %v, want the pair %d", dead, a)
		}
		if _, ok := s.Lookup(pair); ok {
			t.Error("the expired pair is still found")
		}
	})
	got, ts3 := push(t, p, src, rcv)
	expect(t, "push 3: the pair's stale markers", got, map[string][]remotewrite.Sample{
		pairBytes:   {{Value: stale, Timestamp: ts3}},
		pairPackets: {{Value: stale, Timestamp: ts3}},
		zoneBytes:   {{Value: 50, Timestamp: ts3}},
		oldBytes:    {{Value: 70, Timestamp: ts3}},
		maybeBytes:  {{Value: 80, Timestamp: ts3}},
	})
	got, ts4 := push(t, p, src, rcv)
	expect(t, "push 4: the pair ended", got, map[string][]remotewrite.Sample{
		zoneBytes:  {{Value: 50, Timestamp: ts4}},
		oldBytes:   {{Value: 70, Timestamp: ts4}},
		maybeBytes: {{Value: 80, Timestamp: ts4}},
	})

	// The zone series idles out and comes back before the next push,
	// declared created a minute ago: no stale marker, a zero after the
	// last push's stamp (where the receiver may hold an older series'
	// stale marker), then its value, a counter reset.
	src.do(func(s *series.Store) {
		s.Add(0, 0, 0, nowNS+20)
		s.Add(1, 0, 0, nowNS+20)
		if dead := s.Expire(nowNS+15, nil); !slices.Equal(dead, []uint32{z}) {
			t.Fatalf("Expire = %v, want the zone series %d", dead, z)
		}
		z2 := s.Create(2, zone, "", created, nowNS+20)
		s.Add(z2, 5, 0, nowNS+20)
	})
	afterMilli(t, ts4+1)
	got, ts5 := push(t, p, src, rcv)
	expect(t, "push 5: the zone series re-created", got, map[string][]remotewrite.Sample{
		zoneBytes:  {{Value: 0, Timestamp: ts4 + 1}, {Value: 5, Timestamp: ts5}},
		oldBytes:   {{Value: 70, Timestamp: ts5}},
		maybeBytes: {{Value: 80, Timestamp: ts5}},
	})
	got, ts6 := push(t, p, src, rcv)
	expect(t, "push 6", got, map[string][]remotewrite.Sample{
		zoneBytes:  {{Value: 5, Timestamp: ts6}},
		oldBytes:   {{Value: 70, Timestamp: ts6}},
		maybeBytes: {{Value: 80, Timestamp: ts6}},
	})
	if d := src.watermark.Load(); d != ts6 {
		t.Errorf("watermark %d, want the last push's stamp %d", d, ts6)
	}
}

// TestCaptureEncodeConcurrentIngest pushes while series are created,
// updated and expired under the owner's lock, as the aggregator does
// between the capture and the end of its encoding (run with -race). The
// ingest keeps its own counts; at the end the receiver's last sample of
// each series must be the count, or a stale marker for the series
// expired, and each series' stamps must increase.
func TestCaptureEncodeConcurrentIngest(t *testing.T) {
	src := &storeSource{s: series.New()}
	rcv := newReceiver(t)
	cfg := remotewrite.DefaultPusherConfig()
	cfg.MaxSeriesPerRequest = 7
	p := newTestPusher(t, cfg, src, rcv)

	type counts struct{ bytes, packets uint64 }
	live := map[string]*counts{} // by bytes label string; guarded by src.mu
	refKey := map[uint32]string{}
	// More series than one chunk of records holds (4096), created while
	// pushes go on; each touched every ids iterations, and idle after
	// idle ones, so that series expire and come back.
	const ids, idle, iterations = 6000, 4000, 20_000
	labelsOf := func(i int) []metrics.Label {
		return lbl("__name__", "kzn_c_bytes_total", "id", fmt.Sprintf("%04d", i))
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range iterations {
			src.mu.Lock()
			clock := int64(i + 1)
			ls := labelsOf((i * 7) % ids)
			ref, ok := src.s.Lookup(ls)
			if !ok {
				ref = src.s.Create(1, ls, "kzn_c_packets_total", time.Now().UnixMilli()-1000, clock)
				refKey[ref] = key(ls)
				live[key(ls)] = &counts{}
			}
			src.s.Add(ref, 100, 1, clock)
			live[key(ls)].bytes += 100
			live[key(ls)].packets++
			if i%500 == 0 {
				for _, ref := range src.s.Expire(clock-idle, nil) {
					delete(live, refKey[ref])
				}
			}
			src.mu.Unlock()
		}
	}()
	samples := map[string][]remotewrite.Sample{}
	pushes := 0
	collect := func() {
		pushes++
		got, _ := push(t, p, src, rcv)
		for k, v := range got {
			samples[k] = append(samples[k], v...)
		}
	}
	for ingesting := true; ingesting; {
		select {
		case <-done:
			ingesting = false
		default:
		}
		collect() // once more after the ingest ended
	}
	t.Logf("%d pushes, %d series received", pushes, len(samples))

	src.mu.Lock()
	defer src.mu.Unlock()
	if len(live) == 0 || len(samples) == 0 {
		t.Fatalf("%d live series, %d received: the test exercised nothing", len(live), len(samples))
	}
	for k, c := range live {
		ls := strings.TrimPrefix(k, "__name__=kzn_c_bytes_total")
		for _, s := range []struct {
			name string
			want uint64
		}{{"kzn_c_bytes_total", c.bytes}, {"kzn_c_packets_total", c.packets}} {
			got := samples["__name__="+s.name+ls]
			if len(got) == 0 || got[len(got)-1].Value != float64(s.want) {
				t.Errorf("series %s%s: last samples %v, want the count %d", s.name, ls, tail(got), s.want)
			}
		}
	}
	for k, got := range samples {
		for i := 1; i < len(got); i++ {
			if got[i].Timestamp <= got[i-1].Timestamp {
				t.Errorf("series %s: stamp %d after %d", k, got[i].Timestamp, got[i-1].Timestamp)
				break
			}
		}
		bytesKey := strings.Replace(k, "kzn_c_packets_total", "kzn_c_bytes_total", 1)
		if _, ok := live[bytesKey]; !ok && !remotewrite.IsStaleNaN(got[len(got)-1].Value) {
			t.Errorf("series %s expired, but its last samples are %v, not a stale marker", k, tail(got))
		}
	}
}

func tail(s []remotewrite.Sample) []remotewrite.Sample { return s[max(0, len(s)-3):] }

// hookLocker is the owner's lock of a test: it runs between, at the
// n-th Lock (from 1), what ingest would do while a capture walks or a
// view copies.
type hookLocker struct {
	sync.Mutex
	locks int
	at    map[int]func()
}

func (l *hookLocker) Lock() {
	l.Mutex.Lock()
	l.locks++
	if f := l.at[l.locks]; f != nil {
		f()
	}
}

// TestCaptureWalkInterleaved: a capture walked a chunk at a time holds
// the series live when it started, each with its value when its chunk
// was walked; a series declared while it walks, in a chunk walked or
// not, waits for the next capture (with its zero), and so does the
// stale marker of one expired meanwhile.
func TestCaptureWalkInterleaved(t *testing.T) {
	s := series.New()
	labels := func(i int) []metrics.Label { return lbl("__name__", "a_bytes", "id", fmt.Sprint(i)) }
	const n = 2*series.ChunkSize + 100 // three chunks
	for i := range n {
		s.Add(s.Create(1, labels(i), "a_packets", 1, 10), uint64(i), 1, 10)
	}
	s.Capture(100, 0)
	// A free ref in the first chunk, for a series declared mid-walk.
	s.Add(10, 0, 0, 5)
	if dead := s.Expire(10, nil); !slices.Equal(dead, []uint32{10}) {
		t.Fatalf("Expire = %v, want [10]", dead)
	}
	s.Capture(200, 0) // the stale marker of 10
	s.Capture(300, 0) // 10 freed

	walked, unwalked := uint32(20), uint32(series.ChunkSize+5)
	expWalked, expUnwalked := uint32(30), uint32(series.ChunkSize+7)
	var reused, appended uint32
	mu := &hookLocker{at: map[int]func(){
		3: func() { // (1: StartCapture) the first chunk walked, the second not
			reused = s.Create(1, labels(-1), "a_packets", 350, 20)
			appended = s.Create(1, labels(-2), "a_packets", 350, 20)
			s.Add(walked, 7, 1, 20)
			s.Add(unwalked, 5, 1, 20)
			s.Add(expWalked, 0, 0, 1)
			s.Add(expUnwalked, 0, 0, 1)
			if dead := s.Expire(2, nil); !slices.Equal(sorted(dead), []uint32{expWalked, expUnwalked}) {
				t.Errorf("Expire mid-walk = %v, want [%d %d]", dead, expWalked, expUnwalked)
			}
		},
	}}
	mu.Lock()
	c, newly := s.StartCapture(400, 0)
	mu.Unlock()
	if newly {
		t.Error("StartCapture: newly with every live series pushed")
	}
	c.Walk(mu)
	if reused != 10 || appended != n {
		t.Fatalf("series declared mid-walk at refs %d, %d, want 10 (freed) and %d (new)", reused, appended, n)
	}
	got, stale := c.Values()
	if len(stale) != 0 {
		t.Errorf("stale markers %v, want none: the expiries mid-walk are the next capture's", stale)
	}
	want := map[uint32]uint64{}
	for i := range uint32(n) {
		want[i] = uint64(i)
	}
	delete(want, 10)          // freed before the capture
	delete(want, expUnwalked) // expired before its chunk was walked
	want[unwalked] += 5       // its chunk walked after the add
	if len(got) != len(want) {
		t.Errorf("capture holds %d series, want %d", len(got), len(want))
	}
	for ref, v := range want {
		if got[ref] != v {
			t.Errorf("series %d: %d bytes in the capture, want %d", ref, got[ref], v)
		}
	}
	for _, ref := range []uint32{reused, appended} {
		if _, ok := got[ref]; ok {
			t.Errorf("series %d, declared while the capture walked, is in it", ref)
		}
		if p := s.Pushed(ref); p != 0 {
			t.Errorf("series %d: first push %d, want none yet", ref, p)
		}
	}

	c, newly = s.Capture(500, 0)
	if !newly {
		t.Error("next capture: not newly, with two series never pushed")
	}
	got, stale = c.Values()
	for _, ref := range []uint32{reused, appended} {
		if _, ok := got[ref]; !ok {
			t.Errorf("series %d missing from the next capture", ref)
		}
		if p := s.Pushed(ref); p != 500 {
			t.Errorf("series %d: first push %d, want 500", ref, p)
		}
	}
	if !slices.Equal(sorted(stale), []uint32{expWalked, expUnwalked}) {
		t.Errorf("next capture's stale markers %v, want [%d %d]", stale, expWalked, expUnwalked)
	}
	if got[walked] != uint64(walked)+7 {
		t.Errorf("series %d: %d bytes in the next capture, want %d", walked, got[walked], uint64(walked)+7)
	}
}

// TestStartDuringWalk: a view or another capture cannot start while a
// capture walks; the owner orders them.
func TestStartDuringWalk(t *testing.T) {
	for _, tc := range []struct {
		name  string
		start func(s *series.Store)
	}{
		{"view", func(s *series.Store) { s.StartView() }},
		{"capture", func(s *series.Store) { s.StartCapture(2, 0) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := series.New()
			s.Create(1, lbl("__name__", "a_bytes"), "", 1, 1)
			s.StartCapture(1, 0)
			defer func() {
				if recover() == nil {
					t.Errorf("%s started while a capture walks: want a panic", tc.name)
				}
			}()
			tc.start(s)
		})
	}
}
