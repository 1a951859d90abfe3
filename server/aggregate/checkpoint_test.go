package aggregate

import (
	"encoding/binary"
	"errors"
	"maps"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/server/series"
)

// body assembles a checkpoint body from its fields, for bodies WriteTo
// would never write.
type body struct {
	version, slots uint64
	delivered      int64
	strs           []string
	series         []bodySeries
	trailing       []byte
	// raw, when set, replaces everything after the string table.
	raw []byte
}

type bodySeries struct {
	ref            uint64
	kind           byte
	created, last  int64
	pushed         int64
	bytes, packets uint64
	labels         []uint64 // string indices, name and value alternating
}

func (b body) encode() []byte {
	var out []byte
	out = binary.AppendUvarint(out, b.version)
	out = binary.AppendVarint(out, b.delivered)
	out = binary.AppendUvarint(out, b.slots)
	out = binary.AppendUvarint(out, uint64(len(b.strs)))
	for _, s := range b.strs {
		out = appendString(out, s)
	}
	if b.raw != nil {
		return append(out, b.raw...)
	}
	out = binary.AppendUvarint(out, uint64(len(b.series)))
	for _, s := range b.series {
		out = binary.AppendUvarint(out, s.ref)
		out = append(out, s.kind)
		out = binary.AppendVarint(out, s.created)
		out = binary.AppendVarint(out, s.last)
		out = binary.AppendVarint(out, s.pushed)
		out = binary.AppendUvarint(out, s.bytes)
		out = binary.AppendUvarint(out, s.packets)
		out = binary.AppendUvarint(out, uint64(len(s.labels)/2))
		for _, i := range s.labels {
			out = binary.AppendUvarint(out, i)
		}
	}
	return append(out, b.trailing...)
}

// zoneStrs and zoneLabels are a string table and the indices of a valid
// zone-pair series' labels in it.
var (
	zoneStrs = []string{"__name__", MetricZonePairBytes, "dst_zone", "b", "src_zone", "a"}
	zoneIdx  = []uint64{0, 1, 2, 3, 4, 5}
)

func TestRestoreRefuses(t *testing.T) {
	valid := body{version: checkpointVersionV2, slots: 2, strs: zoneStrs,
		series: []bodySeries{{ref: 1, kind: byte(kindZone), created: 1, last: 1, bytes: 10, packets: 1, labels: zoneIdx}}}
	if err := fuzzAggregator(t, nil).Restore(valid.encode()); err != nil {
		t.Fatalf("the valid body the cases start from is refused: %v", err)
	}
	with := func(f func(b *body)) []byte {
		b := valid
		b.series = slices.Clone(valid.series)
		f(&b)
		return b.encode()
	}
	for _, tc := range []struct {
		name string
		body []byte
	}{
		{"empty", nil},
		{"other version", with(func(b *body) { b.version = checkpointVersion + 1 })},
		{"truncated", valid.encode()[:len(valid.encode())-1]},
		{"trailing bytes", with(func(b *body) { b.trailing = []byte{0} })},
		{"more live series than slots", with(func(b *body) { b.slots = 0 })},
		{"ref out of range", with(func(b *body) { b.series[0].ref = 2 })},
		{"ref twice", with(func(b *body) { b.slots = 3; b.series = append(b.series, b.series[0]) })},
		{"series twice", with(func(b *body) {
			b.slots = 3
			s := b.series[0]
			s.ref = 2
			b.series = append(b.series, s)
		})},
		{"free kind", with(func(b *body) { b.series[0].kind = byte(kindFree) })},
		{"unknown kind", with(func(b *body) { b.series[0].kind = byte(kindCross + 1) })},
		{"labels of another kind", with(func(b *body) { b.series[0].kind = byte(kindCross) })},
		{"labels unsorted", with(func(b *body) { b.series[0].labels = []uint64{0, 1, 4, 5, 2, 3} })},
		{"no __name__", with(func(b *body) { b.series[0].labels = zoneIdx[2:] })},
		{"string index out of range", with(func(b *body) { b.series[0].labels = []uint64{0, 1, 2, 6} })},
		// The value's index is read after the name's failed: with no
		// strings at all, there is nothing to fall back on.
		{"string index with no strings", with(func(b *body) { b.strs = nil; b.series[0].labels = []uint64{5, 0} })},
		{"string count beyond the body", []byte{checkpointVersion, 0, 0, 200, 0}},
		{"live count beyond the body", with(func(b *body) { b.raw = []byte{100, 0, 0, 0} })},
		// Refs are uint32 and ^uint32(0) is a route's "no series":
		// a body cannot have that many slots.
		{"slots beyond refs", with(func(b *body) { b.slots = 1 << 32; b.series = nil })},
		{"slots far beyond refs", with(func(b *body) { b.slots = 1 << 62; b.series = nil })},
		{"slots beyond the bound", with(func(b *body) { b.slots = maxSlots + 1; b.series = nil })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := restored(t, fuzzState(t), nil)
			before := dump(a)
			if err := a.Restore(tc.body); err == nil {
				t.Fatal("body restored, want an error")
			}
			if dump(a) != before {
				t.Fatal("refused body changed the state")
			}
		})
	}
}

// TestRestoreFreeSlots checks that slots without a series, which cost
// nothing in a body, come back as free refs that new series take.
func TestRestoreFreeSlots(t *testing.T) {
	b := body{version: checkpointVersionV2, slots: 1000, delivered: 5, strs: zoneStrs,
		series: []bodySeries{{ref: 500, kind: byte(kindZone), created: 1, last: fuzzStart.UnixNano(), bytes: 10, packets: 1, labels: zoneIdx}}}
	a := fuzzAggregator(t, nil)
	if err := a.Restore(b.encode()); err != nil {
		t.Fatal(err)
	}
	a.FinishReplay()
	a.Apply(fuzzStart, []Flow{cf(webA, dbB, 1, 1), cf(dbB, webA, 2, 1)}, nil)
	if a.store.Slots() != 1000 {
		t.Errorf("%d slots after new series, want the 1000 restored (free ones reused)", a.store.Slots())
	}
	got := render(a.AppendSeries(nil))
	if !slices.Contains(got, `kubezonnet_zone_pair_bytes_total{dst_zone="b",src_zone="a"} 11`) {
		t.Errorf("restored series lost its count:\n%s", got)
	}
	if a.Len() != 6 {
		t.Errorf("Len = %d, want 6 (zone a->b, zone b->a, two pairs, two cross)", a.Len())
	}
}

// TestReplayRefuses feeds Replay records that decode but must not apply:
// each is refused and changes nothing.
func TestReplayRefuses(t *testing.T) {
	state := fuzzState(t)
	a := restored(t, state, nil)
	var zoneRef uint32 = noRef
	for ref := range uint32(a.store.Slots()) {
		if a.store.Kind(ref) == kindZone {
			zoneRef = ref
			break
		}
	}
	if zoneRef == noRef {
		t.Fatal("fuzz state without a zone pair")
	}
	end := uint64(a.store.Slots())
	zone := func(src, dst string) []metrics.Label {
		return zoneLabels(nil, MetricZonePairBytes, src, dst)
	}
	type decl struct {
		ref  uint64
		kind seriesKind
		lab  []metrics.Label
	}
	type fl5 struct{ zone, pair, cross, bytes, packets uint64 }
	batch := func(decls []decl, flows []fl5, trailing ...byte) []byte {
		b := []byte{recBatchNoService, 0}
		b = binary.AppendVarint(b, fuzzStart.UnixNano())
		b = binary.AppendUvarint(b, uint64(len(decls)))
		for _, d := range decls {
			b = binary.AppendUvarint(b, d.ref)
			b = append(b, byte(d.kind))
			b = binary.AppendVarint(b, 7)
			b = appendLabels(b, d.lab)
		}
		b = binary.AppendUvarint(b, uint64(len(flows)))
		for _, f := range flows {
			for _, v := range []uint64{f.zone, f.pair, f.cross, f.bytes, f.packets} {
				b = binary.AppendUvarint(b, v)
			}
		}
		return append(b, trailing...)
	}
	z := uint64(zoneRef)
	for _, tc := range []struct {
		name string
		rec  []byte
	}{
		{"empty", nil},
		{"unknown type", []byte{9}},
		{"trailing bytes", batch(nil, []fl5{{zone: z, bytes: 1}}, 0)},
		{"flow to a missing ref", batch(nil, []fl5{{zone: end, bytes: 1}})},
		{"flow to a pair as zone", batch([]decl{{end, kindCross, []metrics.Label{{Name: "__name__", Value: MetricPodCrossZone}, {Name: "pod", Value: "x"}}}},
			[]fl5{{zone: end, bytes: 1}})},
		{"declaration in use", batch([]decl{{z, kindZone, zone("x", "y")}}, nil)},
		{"declaration past the end", batch([]decl{{end + 1, kindZone, zone("x", "y")}}, nil)},
		{"declaration of a live series", batch([]decl{{end, kindZone, zoneLabelsOf(a, zoneRef)}}, nil)},
		{"declaration twice", batch([]decl{{end, kindZone, zone("x", "y")}, {end, kindZone, zone("x", "z")}}, nil)},
		// Two new series with the same labels: the state would hold a
		// series twice, which no checkpoint of it could restore.
		{"same labels declared twice", batch([]decl{{end, kindZone, zone("x", "y")}, {end + 1, kindZone, zone("x", "y")}}, nil)},
		// A counter that would wrap: Prometheus reads it as a reset.
		{"bytes overflow", batch(nil, []fl5{{zone: z, bytes: math.MaxUint64}})},
		{"packets overflow", batch(nil, []fl5{{zone: z, bytes: 1, packets: math.MaxUint64 - 1}})},
		{"overflow over flows", batch(nil, []fl5{{zone: z, bytes: math.MaxUint64 / 2}, {zone: z, bytes: math.MaxUint64 / 2}, {zone: z, bytes: 100}})},
		{"expire of a free ref", func() []byte {
			for ref := range uint32(a.store.Slots()) {
				if a.store.Kind(ref) == kindFree {
					return appendExpire(nil, fuzzStart, []uint32{ref})
				}
			}
			t.Fatal("fuzz state without a free ref")
			return nil
		}()},
		{"expire out of range", appendExpire(nil, fuzzStart, []uint32{uint32(end)})},
		{"delivered with trailing bytes", append(appendDelivered(nil, 5), 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := restored(t, state, nil)
			before := dump(a)
			if _, err := a.Replay(tc.rec); err == nil {
				t.Fatal("record replayed, want an error")
			}
			if dump(a) != before {
				t.Fatal("refused record changed the state")
			}
		})
	}
}

// TestRestoreKeepsIdleTime checks that a restored series keeps its idle
// time: it expires when it would have without a restart.
func TestRestoreKeepsIdleTime(t *testing.T) {
	now := fuzzStart
	a, err := New(Config{MaxPodPairs: 3, IdleTimeout: time.Minute, Now: func() time.Time { return now }}, metrics.New())
	if err != nil {
		t.Fatal(err)
	}
	a.Apply(now, []Flow{cf(webA, dbB, 1, 1)}, nil)
	now = now.Add(40 * time.Second)
	a.Apply(now, []Flow{cf(nodeB, inet, 1, 1)}, nil)
	b, err := New(Config{MaxPodPairs: 3, IdleTimeout: time.Minute, Now: func() time.Time { return now }}, metrics.New())
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Restore(checkpointOf(t, a)); err != nil {
		t.Fatal(err)
	}
	b.FinishReplay()
	now = now.Add(30 * time.Second) // 70s after the first flow, 30s after the second
	if got := render(b.AppendSeries(nil)); len(got) != 4 {
		t.Errorf("after restore and 70s: %d series, want the 4 of the second flow:\n%s", len(got), got)
	}
}

// TestRestoreRefusesLabelIndex: a version-3 body naming a label beyond
// its table is refused and changes nothing, as is one whose table entry
// is cut short.
func TestRestoreRefusesLabelIndex(t *testing.T) {
	head := func(labels ...string) []byte {
		b := binary.AppendUvarint(nil, checkpointVersion)
		b = binary.AppendVarint(b, 0)  // delivered
		b = binary.AppendUvarint(b, 1) // slots
		b = binary.AppendUvarint(b, uint64(len(labels)/2))
		for _, s := range labels {
			b = appendString(b, s)
		}
		return b
	}
	zone := func(idx ...uint64) []byte {
		b := head("__name__", MetricZonePairBytes, "dst_zone", "b", "src_zone", "a")
		b = binary.AppendUvarint(b, 1) // live
		b = binary.AppendUvarint(b, 0) // ref
		b = append(b, byte(kindZone))
		for range 3 { // created, last, pushed
			b = binary.AppendVarint(b, 1)
		}
		b = binary.AppendUvarint(b, 10) // bytes
		b = binary.AppendUvarint(b, 1)  // packets
		b = binary.AppendUvarint(b, uint64(len(idx)))
		for _, i := range idx {
			b = binary.AppendUvarint(b, i)
		}
		return b
	}
	a, err := New(Config{MaxPodPairs: 10, IdleTimeout: time.Hour}, metrics.New())
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Restore(zone(0, 1, 2)); err != nil {
		t.Fatalf("the valid body is refused: %v", err)
	}
	want := values(a.AppendSeries(nil))
	for name, body := range map[string][]byte{
		"label index out of range": zone(0, 1, 3),
		"table cut short":          head("__name__", MetricZonePairBytes, "dst_zone"),
	} {
		if err := a.Restore(body); err == nil || !errors.Is(err, errRecord) {
			t.Errorf("%s: Restore error %v, want errRecord", name, err)
		}
		if got := values(a.AppendSeries(nil)); !maps.Equal(got, want) {
			t.Errorf("%s: state changed: %v, want %v", name, got, want)
		}
	}
}

// zoneLabelsOf returns the labels of a's series ref.
func zoneLabelsOf(a *Aggregator, ref uint32) []metrics.Label {
	var s series.Series
	a.store.Get(ref, &s)
	return s.Labels
}
