package aggregate

import (
	"bytes"
	"encoding/binary"
	"strconv"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/server/series"
)

// fuzzStart is the fuzz targets' clock; their idle timeout is long enough
// that nothing expires on its own.
var fuzzStart = time.Unix(1_700_000_000, 0)

func fuzzAggregator(tb testing.TB, j Journal) *Aggregator {
	tb.Helper()
	a, err := New(Config{MaxPodPairs: 3, IdleTimeout: 1000 * time.Hour, Now: func() time.Time { return fuzzStart.Add(time.Hour) }, Journal: j}, metrics.New())
	if err != nil {
		tb.Fatal(err)
	}
	return a
}

// fuzzState builds the state the fuzz targets start from: pod pairs up
// to the limit and a folded one, host pairs, cross-zone series, and free
// refs left by an expiry. It returns the checkpoint body.
func fuzzState(tb testing.TB) []byte {
	tb.Helper()
	a, err := New(Config{MaxPodPairs: 3, IdleTimeout: time.Minute, Now: func() time.Time { return fuzzStart }}, metrics.New())
	if err != nil {
		tb.Fatal(err)
	}
	t0 := fuzzStart.Add(-5 * time.Minute)
	a.Apply(t0, []Flow{cf(webA2, cacheC, 1, 1), cf(nodeB, unknownEP, 2, 1)}, nil) // expire below
	a.Apply(fuzzStart, []Flow{
		cf(webA, dbB, 1000, 10), cf(webB, dbA, 500, 5), cf(webA2, dbB, 70, 1),
		cf(dbB, webA, 30, 1), cf(nodeB, inet, 42, 1), cf(webA, unknownEP, 64, 1),
	}, nil)
	a.Expire(fuzzStart)
	a.Delivered(fuzzStart.UnixMilli() - 1)
	var buf bytes.Buffer
	if _, err := a.Snapshot(nil).WriteTo(&buf); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// restored returns an aggregator holding body, as at start before the
// journal's replay.
func restored(tb testing.TB, body []byte, j Journal) *Aggregator {
	tb.Helper()
	a := fuzzAggregator(tb, j)
	if err := a.Restore(body); err != nil {
		tb.Fatalf("restoring the fuzz state: %v", err)
	}
	return a
}

// checkpointOf is everything a checkpoint holds of a: refs, kinds,
// labels, counters, times and the delivered stamp.
func checkpointOf(tb testing.TB, a *Aggregator) []byte {
	tb.Helper()
	var buf bytes.Buffer
	if _, err := a.Snapshot(nil).WriteTo(&buf); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// dump renders a's whole state, indexes and free list included: what
// must not change when a record or a body is refused. (Cheaper than a
// checkpoint, whose writer buffers 256 KiB, so the fuzz targets stay
// fast.)
func dump(a *Aggregator) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	b := make([]byte, 0, 4096)
	num := func(v int64) { b = strconv.AppendInt(append(b, ' '), v, 10) }
	v := a.store.View()
	defer a.store.Unpin(v)
	v.Each(func(s *series.Series) {
		num(int64(s.Ref))
		num(int64(s.Kind))
		num(s.Created)
		num(s.Last)
		b = strconv.AppendUint(append(b, ' '), s.Bytes, 10)
		b = strconv.AppendUint(append(b, ' '), s.Packets, 10)
		num(s.Pushed)
		b = append(b, " {"...)
		for _, l := range s.Labels {
			b = strconv.AppendQuote(append(append(b, l.Name...), '='), l.Value)
		}
		b = append(b, "}\n"...)
	})
	for _, v := range []int64{a.delivered, int64(a.store.Count(kindPair)), int64(a.store.Slots()), int64(a.store.Len()), int64(a.store.Symbols()), int64(len(a.routes))} {
		num(v)
	}
	return string(b)
}

// values maps each series' labels to its value.
func values(series []remotewrite.Series) map[string]float64 {
	m := map[string]float64{}
	for _, s := range series {
		var b []byte
		for _, l := range s.Labels {
			b = append(b, l.Name...)
			b = append(b, 0)
			b = append(b, l.Value...)
			b = append(b, 0)
		}
		m[string(b)] = s.Value
	}
	return m
}

// replaySeeds returns journal records valid on the fuzz state: each is the
// record of one change made to a copy restored from body.
func replaySeeds(tb testing.TB, body []byte) [][]byte {
	tb.Helper()
	var seeds [][]byte
	for _, change := range []func(a *Aggregator){
		func(a *Aggregator) { // known series only
			a.Apply(fuzzStart.Add(time.Second), []Flow{cf(webA, dbB, 5, 1), cf(nodeB, inet, 6, 1)}, nil)
		},
		func(a *Aggregator) { // new series in free refs and past the end, a fold
			a.Apply(fuzzStart.Add(time.Second), []Flow{
				cf(cacheC, webA, 9, 1), cf(inet, nodeB, 8, 1), cf(webA2, unknownEP, 7, 1),
				cf(dbA, cacheC, 6, 1), cf(webA, webA2, 5, 1),
			}, &BatchID{Node: "n-a", Incarnation: "i1", Seq: 7})
		},
		func(a *Aggregator) { // counts a few doublings short of wrapping
			a.Apply(fuzzStart.Add(time.Second), []Flow{cf(webA, dbB, 1<<62, 1<<61), cf(dbB, webA, 1<<62, 1)}, nil)
		},
		func(a *Aggregator) { a.Expire(fuzzStart.Add(1001 * time.Hour)) },
		func(a *Aggregator) { a.Delivered(fuzzStart.UnixMilli() + 5) },
	} {
		j := &memJournal{}
		a := restored(tb, body, j)
		a.FinishReplay()
		change(a)
		if len(j.recs) != 1 {
			tb.Fatalf("a seed change journaled %d records", len(j.recs))
		}
		seeds = append(seeds, j.recs[0])
	}
	return seeds
}

// FuzzReplay feeds arbitrary records to Replay on an aggregator holding
// state. Replay must never panic; a record it refuses must change nothing;
// a record it accepts must not make any counter go down, and must leave a
// state that checkpoints, restores and takes traffic.
func FuzzReplay(f *testing.F) {
	body := fuzzState(f)
	for _, rec := range replaySeeds(f, body) {
		f.Add(rec)
		f.Add(rec[:len(rec)/2])
	}
	f.Add([]byte{})
	f.Add([]byte{recExpire, 0, 1, 200})
	f.Fuzz(func(t *testing.T, rec []byte) {
		a := restored(t, body, nil)
		before := dump(a)
		beforeValues := values(a.AppendSeries(nil))
		if _, err := a.Replay(rec); err != nil {
			if after := dump(a); after != before {
				t.Fatalf("refused record (%v) changed the state:\n%s\nwas\n%s", err, after, before)
			}
			return
		}
		for k, v := range values(a.AppendSeries(nil)) {
			if old, ok := beforeValues[k]; ok && v < old {
				t.Fatalf("series %q went from %v to %v", k, old, v)
			}
		}
		// What Replay accepted, a checkpoint holds and Restore takes back.
		roundTrips(t, a, "state after an accepted record")
		a.FinishReplay()
		a.Apply(fuzzStart.Add(2*time.Hour), []Flow{cf(webA, dbB, 1, 1), cf(cacheC, webA2, 1, 1)}, nil)
	})
}

// roundTrips checks that a's checkpoint restores into a fresh aggregator
// whose checkpoint is the same bytes; what names a's state in failures.
func roundTrips(t *testing.T, a *Aggregator, what string) {
	t.Helper()
	body := checkpointOf(t, a)
	b := fuzzAggregator(t, nil)
	if err := b.Restore(body); err != nil {
		t.Fatalf("%s does not restore: %v", what, err)
	}
	if again := checkpointOf(t, b); !bytes.Equal(again, body) {
		t.Fatalf("%s restores differently", what)
	}
}

// maxFuzzSlots bounds the series slots a fuzzed checkpoint body may claim.
// Free slots cost nothing in a body, and Restore allocates the slots a
// body says the aggregator had, up to maxSlots: far more memory and time
// than one fuzz input should take. TestRestoreRefuses covers the bound;
// 4096 slots are plenty for free slots to be exercised.
const maxFuzzSlots = 1 << 12

// FuzzRestore feeds arbitrary checkpoint bodies to Restore on an
// aggregator holding state. Restore must never panic; a body it refuses
// must change nothing; a body it accepts must checkpoint back to a body
// that restores to the same state, and take traffic.
func FuzzRestore(f *testing.F) {
	body := fuzzState(f)
	f.Add(body)
	f.Add(body[:len(body)-3])
	f.Add(checkpointOf(f, fuzzAggregator(f, nil)))
	// The states after each seed record: series in reused and new refs,
	// fewer series, another delivered stamp.
	for _, rec := range replaySeeds(f, body) {
		a := restored(f, body, nil)
		if _, err := a.Replay(rec); err != nil {
			f.Fatal(err)
		}
		f.Add(checkpointOf(f, a))
	}

	f.Fuzz(func(t *testing.T, in []byte) {
		if slots, ok := claimedSlots(in); ok && slots > maxFuzzSlots {
			return
		}
		a := restored(t, body, nil)
		before := dump(a)
		if err := a.Restore(in); err != nil {
			if after := dump(a); after != before {
				t.Fatalf("refused body (%v) changed the state:\n%s\nwas\n%s", err, after, before)
			}
			return
		}
		roundTrips(t, a, "checkpoint of an accepted body")
		a.FinishReplay()
		a.AppendSeries(nil)
		a.Apply(fuzzStart.Add(2*time.Hour), []Flow{cf(webA, dbB, 1, 1), cf(cacheC, webA2, 1, 1), cf(nodeB, inet, 1, 1)}, nil)
	})
}

// claimedSlots decodes the slot count at the start of a checkpoint body.
func claimedSlots(body []byte) (uint64, bool) {
	for range 2 { // version, delivered: both varints as far as length goes
		_, n := binary.Uvarint(body)
		if n <= 0 {
			return 0, false
		}
		body = body[n:]
	}
	v, n := binary.Uvarint(body)
	return v, n > 0
}
