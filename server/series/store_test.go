package series_test

// Table tests of the store's API, each against expectations written by
// hand, and a differential test that drives the store and a plain
// map-based model of its documented behaviour (model, below) with random
// operations and compares them after every step. The fuzz target
// (fuzz_test.go) runs the same driver on the fuzzer's input.

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/server/series"
)

// lbl builds a label set from name, value pairs, in the order given (the
// caller writes them sorted, __name__ first, as Create requires).
func lbl(pairs ...string) []metrics.Label {
	if len(pairs)%2 != 0 {
		panic("lbl: odd number of arguments")
	}
	ls := make([]metrics.Label, 0, len(pairs)/2)
	for i := 0; i < len(pairs); i += 2 {
		ls = append(ls, metrics.Label{Name: pairs[i], Value: pairs[i+1]})
	}
	return ls
}

// key renders a label set as one string, the model's map key.
func key(ls []metrics.Label) string {
	var b strings.Builder
	for i, l := range ls {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(l.Name)
		b.WriteByte('=')
		b.WriteString(l.Value)
	}
	return b.String()
}

// mustLookup returns the ref of the live series ls, failing without one.
func mustLookup(t *testing.T, s *series.Store, ls []metrics.Label) uint32 {
	t.Helper()
	ref, ok := s.Lookup(ls)
	if !ok {
		t.Fatalf("Lookup(%s): not found", key(ls))
	}
	return ref
}

func TestCreateLookupAdd(t *testing.T) {
	type decl struct {
		ls   []metrics.Label
		kind series.Kind
	}
	type add struct {
		i              int // index in series
		bytes, packets uint64
		ts             int64
	}
	type counts struct {
		bytes, packets uint64
		last           int64
	}
	tests := []struct {
		name   string
		series []decl
		adds   []add
		want   []counts // per series, after the adds
		absent [][]metrics.Label
	}{
		{
			name:   "one series, two adds",
			series: []decl{{lbl("__name__", "a_bytes", "pod", "p1"), 1}},
			adds:   []add{{0, 100, 1, 20}, {0, 20, 2, 30}},
			want:   []counts{{120, 3, 30}},
			absent: [][]metrics.Label{
				lbl("__name__", "a_bytes"),
				lbl("__name__", "a_bytes", "pod", "p2"),
				lbl("__name__", "a_bytes", "pod", "p1", "zone", "z1"),
				lbl("__name__", "b_bytes", "pod", "p1"),
			},
		},
		{
			name: "labels differing in one value",
			series: []decl{
				{lbl("__name__", "a_bytes", "pod", "p1", "zone", "z1"), 1},
				{lbl("__name__", "a_bytes", "pod", "p2", "zone", "z1"), 1},
			},
			adds:   []add{{1, 5, 1, 11}, {0, 7, 2, 12}, {1, 5, 1, 13}},
			want:   []counts{{7, 2, 12}, {10, 2, 13}},
			absent: [][]metrics.Label{lbl("__name__", "a_bytes", "pod", "p3", "zone", "z1")},
		},
		{
			name: "a label set and its prefix",
			series: []decl{
				{lbl("__name__", "a_bytes"), 2},
				{lbl("__name__", "a_bytes", "pod", "p1"), 3},
			},
			adds: []add{{0, 1, 1, 5}},
			// Create's last stays until an Add.
			want:   []counts{{1, 1, 5}, {0, 0, 1}},
			absent: [][]metrics.Label{lbl("__name__", "a_bytes", "zone", "z1")},
		},
		{
			name: "same value under two names",
			series: []decl{
				{lbl("__name__", "a_bytes", "dst", "p1"), 1},
				{lbl("__name__", "a_bytes", "pod", "p1"), 2},
				{lbl("__name__", "b_bytes", "pod", "p1"), 2},
			},
			adds:   []add{{2, 9, 9, 9}},
			want:   []counts{{0, 0, 1}, {0, 0, 1}, {9, 9, 9}},
			absent: [][]metrics.Label{lbl("__name__", "b_bytes", "dst", "p1")},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := series.New()
			refs := make([]uint32, len(tc.series))
			perKind := map[series.Kind]int{}
			for i, d := range tc.series {
				if _, ok := s.Lookup(d.ls); ok {
					t.Fatalf("Lookup(%s) before Create: found", key(d.ls))
				}
				refs[i] = s.Create(d.kind, d.ls, "", 1000, 1)
				perKind[d.kind]++
			}
			for _, a := range tc.adds {
				s.Add(refs[a.i], a.bytes, a.packets, a.ts)
			}
			if got := s.Len(); got != len(tc.series) {
				t.Errorf("Len() = %d, want %d", got, len(tc.series))
			}
			for k := range series.Kind(series.MaxKinds) {
				if got := s.Count(k); got != perKind[k] {
					t.Errorf("Count(%d) = %d, want %d", k, got, perKind[k])
				}
			}
			if u := slices.Compact(slices.Sorted(slices.Values(refs))); len(u) != len(refs) {
				t.Errorf("refs %v are not distinct", refs)
			}
			var got series.Series
			for i, d := range tc.series {
				if ref := mustLookup(t, s, d.ls); ref != refs[i] {
					t.Errorf("Lookup(%s) = %d, want %d (Create's)", key(d.ls), ref, refs[i])
				}
				if ref, ok := s.LookupHashed(d.ls, s.Hash(d.ls)); !ok || ref != refs[i] {
					t.Errorf("LookupHashed(%s) = %d, %v, want %d, true", key(d.ls), ref, ok, refs[i])
				}
				if k := s.Kind(refs[i]); k != d.kind {
					t.Errorf("Kind(%d) = %d, want %d", refs[i], k, d.kind)
				}
				b, p := s.Counts(refs[i])
				if b != tc.want[i].bytes || p != tc.want[i].packets {
					t.Errorf("Counts(%s) = %d, %d, want %d, %d", key(d.ls), b, p, tc.want[i].bytes, tc.want[i].packets)
				}
				s.Get(refs[i], &got)
				if got.Last != tc.want[i].last || got.Created != 1000 || got.Kind != d.kind || key(got.Labels) != key(d.ls) {
					t.Errorf("Get(%d) = %+v, want last %d, created 1000, kind %d, labels %s",
						refs[i], got, tc.want[i].last, d.kind, key(d.ls))
				}
			}
			for _, ls := range tc.absent {
				if ref, ok := s.Lookup(ls); ok {
					t.Errorf("Lookup(%s) = %d, want not found", key(ls), ref)
				}
			}
		})
	}
}

func TestExpire(t *testing.T) {
	tests := []struct {
		name   string
		last   []int64 // per series, at Create
		touch  map[int]int64
		cutoff int64
		want   []int // series expired
	}{
		{name: "strictly before the cutoff", last: []int64{99, 100, 101}, cutoff: 100, want: []int{0}},
		{name: "nothing idle", last: []int64{5, 6}, cutoff: 5},
		{name: "everything idle", last: []int64{1, 2, 3}, cutoff: 1000, want: []int{0, 1, 2}},
		{name: "an Add keeps a series", last: []int64{10, 10, 10}, touch: map[int]int64{1: 200}, cutoff: 100, want: []int{0, 2}},
		{name: "an Add's stamp is the last update", last: []int64{500}, touch: map[int]int64{0: 50}, cutoff: 100, want: []int{0}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := series.New()
			var refs []uint32
			var ls [][]metrics.Label
			for i, last := range tc.last {
				l := lbl("__name__", "a_bytes", "pod", fmt.Sprint("p", i))
				ls = append(ls, l)
				refs = append(refs, s.Create(series.Kind(1+i%2), l, "a_packets", 1, last))
			}
			for i, ts := range tc.touch {
				s.Add(refs[i], 1, 1, ts)
			}
			dead := s.Expire(tc.cutoff, []uint32{7777})
			want := []uint32{7777}
			for _, i := range tc.want {
				want = append(want, refs[i])
			}
			if !slices.Equal(sorted(dead[1:]), sorted(want[1:])) || dead[0] != 7777 {
				t.Errorf("Expire(%d, [7777]) = %v, want [7777] followed by %v", tc.cutoff, dead, want[1:])
			}
			if got, want := s.Len(), len(tc.last)-len(tc.want); got != want {
				t.Errorf("Len() = %d, want %d", got, want)
			}
			perKind := map[series.Kind]int{}
			for i := range tc.last {
				expired := slices.Contains(tc.want, i)
				ref, ok := s.Lookup(ls[i])
				switch {
				case expired && ok:
					t.Errorf("series %d expired, but Lookup finds it at %d", i, ref)
				case !expired && (!ok || ref != refs[i]):
					t.Errorf("series %d kept, but Lookup = %d, %v, want %d, true", i, ref, ok, refs[i])
				}
				wantKind := series.Kind(1 + i%2)
				if expired {
					wantKind = series.Free
				} else {
					perKind[wantKind]++
				}
				if k := s.Kind(refs[i]); k != wantKind {
					t.Errorf("Kind(%d) = %d, want %d", refs[i], k, wantKind)
				}
			}
			for k := series.Kind(1); k < series.MaxKinds; k++ {
				if got := s.Count(k); got != perKind[k] {
					t.Errorf("Count(%d) = %d, want %d", k, got, perKind[k])
				}
			}
			// An expired series is out for good: a second Expire does not
			// report it again.
			if again := s.Expire(tc.cutoff, nil); len(again) != 0 {
				t.Errorf("second Expire(%d) = %v, want nothing", tc.cutoff, again)
			}
		})
	}
}

func sorted(refs []uint32) []uint32 { return slices.Sorted(slices.Values(refs)) }

// refScript runs a small script against a store. Each step is one of
//
//	c NAME [new|=OTHER]  create series NAME (fresh ref past the highest,
//	                     or the ref series OTHER had)
//	x NAME               expire NAME only
//	r NAME               Remove NAME
//	p                    capture
//	d                    Drop
//
// Series NAME is labelled {__name__="m", id=ID}, ID being NAME up to its
// first dot: "a.2" is a series with the labels of "a".
func refScript(t *testing.T, steps []string) {
	t.Helper()
	s := series.New()
	refs := map[string]uint32{}
	var clock, ts int64 = 1, 0
	for i, step := range steps {
		f := strings.Fields(step)
		where := fmt.Sprintf("step %d (%q)", i, step)
		switch f[0] {
		case "c":
			slots := s.Slots()
			clock++
			id, _, _ := strings.Cut(f[1], ".")
			ref := s.Create(1, lbl("__name__", "m", "id", id), "", 1, clock)
			if len(f) > 2 {
				switch w := f[2]; {
				case w == "new" && ref != uint32(slots):
					t.Fatalf("%s: ref %d, want a fresh one (%d)", where, ref, slots)
				case strings.HasPrefix(w, "=") && ref != refs[w[1:]]:
					t.Fatalf("%s: ref %d, want %s's ref %d", where, ref, w[1:], refs[w[1:]])
				}
			}
			refs[f[1]] = ref
		case "x":
			// Touch every other live series, then expire what is older.
			clock++
			target := refs[f[1]]
			for _, ref := range refs {
				if ref != target && s.Kind(ref) != series.Free {
					s.Add(ref, 0, 0, clock)
				}
			}
			if dead := s.Expire(clock, nil); !slices.Equal(dead, []uint32{target}) {
				t.Fatalf("%s: Expire = %v, want [%d]", where, dead, target)
			}
		case "r":
			s.Remove(refs[f[1]])
		case "p":
			ts += 10
			s.Capture(ts, 0)
		case "d":
			s.Drop()
		default:
			t.Fatalf("%s: unknown step", where)
		}
	}
}

func TestRefReuse(t *testing.T) {
	tests := []struct {
		name  string
		steps []string
	}{
		{"expired before any capture: freed by the next one", []string{
			"c a new", "x a", "c b new", "p", "c c =a",
		}},
		{"captured, then expired: stale marker, freed one capture later", []string{
			"c a new", "p", "x a", "c b new", "p", "c c new", "p", "c d =a",
		}},
		{"expired and re-created before the capture: no marker, freed at once", []string{
			"c a new", "p", "x a", "c a.2 new", "p", "c b =a",
		}},
		{"removed: reused at once", []string{
			"c a new", "c b new", "p", "r a", "c c =a",
		}},
		{"remove of an expired series does nothing", []string{
			"c a new", "p", "x a", "r a", "c b new", "p", "c c new",
		}},
		{"dropped after expiry: reused at once", []string{
			"c a new", "p", "x a", "d", "c b =a",
		}},
		{"dropped with a stale marker pending", []string{
			"c a new", "p", "x a", "p", "d", "c b =a",
		}},
		{"every freed ref is reused before a new one", []string{
			"c a new", "c b new", "c c new", "x a", "x b", "p", "c d", "c e", "c f new",
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { refScript(t, tc.steps) })
	}
}

func TestSymbols(t *testing.T) {
	// Each step declares or ends series and states the distinct labels
	// held afterwards, counted by hand.
	s := series.New()
	var clock int64
	create := func(ls []metrics.Label, packets string) uint32 {
		clock++
		return s.Create(1, ls, packets, 1, clock)
	}
	expire := func(refs ...uint32) {
		clock++
		live := map[uint32]bool{}
		s.EachLive(func(ref uint32) { live[ref] = true })
		for ref := range live {
			if !slices.Contains(refs, ref) {
				s.Add(ref, 0, 0, clock)
			}
		}
		if dead := s.Expire(clock, nil); !slices.Equal(sorted(dead), sorted(refs)) {
			t.Fatalf("Expire = %v, want %v", dead, refs)
		}
	}
	var ts int64
	capture := func() { ts += 10; s.Capture(ts, 0) }
	want := func(step string, n int) {
		t.Helper()
		if got := s.Symbols(); got != n {
			t.Fatalf("%s: Symbols() = %d, want %d", step, got, n)
		}
	}

	want("empty", 0)
	r0 := create(lbl("__name__", "a_bytes", "pod", "p1", "zone", "z1"), "")
	want("first series", 3)
	r1 := create(lbl("__name__", "a_bytes", "pod", "p2", "zone", "z1"), "")
	want("second series shares __name__ and zone", 4)
	r2 := create(lbl("__name__", "b_bytes", "pod", "p1"), "b_packets")
	want("a twin: its packets name is a label too", 6)
	r3 := create(lbl("__name__", "a_bytes", "pod", "p3"), "b_bytes")
	want("a twin whose packets name is another series' name", 7)
	r4 := create(lbl("__name__", "a_bytes", "dst", "p1"), "")
	want("the same value under another name", 8)

	capture()
	expire(r0)
	want("r0 expired, its stale marker not written yet", 8)
	capture()
	want("r0's stale marker written", 8)
	capture()
	// r0 held pod=p1 (r2 holds it too) and zone=z1 (r1 too): nothing
	// was its alone.
	want("r0 freed", 8)
	expire(r1, r2)
	capture()
	want("r1, r2 markers written", 8)
	capture()
	// r1 took pod=p2 and zone=z1; r2 pod=p1 and b_packets, but b_bytes
	// stays: r3's packets series is named so.
	want("r1, r2 freed", 4)
	expire(r3)
	capture()
	capture()
	want("r3 freed", 2) // a_bytes, dst=p1 of r4
	s.Remove(r4)
	want("r4 removed: freed at once", 0)

	// Labels freed are interned anew.
	create(lbl("__name__", "a_bytes", "pod", "p1"), "a_packets")
	want("re-created", 3)
}

func TestKindCount(t *testing.T) {
	tests := []struct {
		name    string
		kinds   []series.Kind
		expire  []int // series expired
		remove  []int // series removed
		want    [series.MaxKinds]int
		wantLen int
	}{
		{name: "one of each", kinds: []series.Kind{1, 2, 3, 4, 5, 6, 7}, want: [series.MaxKinds]int{0, 1, 1, 1, 1, 1, 1, 1}, wantLen: 7},
		{name: "same kind", kinds: []series.Kind{2, 2, 2}, want: [series.MaxKinds]int{2: 3}, wantLen: 3},
		{name: "expired leave their kind", kinds: []series.Kind{1, 1, 2}, expire: []int{0}, want: [series.MaxKinds]int{1: 1, 2: 1}, wantLen: 2},
		{name: "removed leave their kind", kinds: []series.Kind{1, 7, 7}, remove: []int{1, 2}, want: [series.MaxKinds]int{1: 1}, wantLen: 1},
		{name: "both", kinds: []series.Kind{3, 3, 3, 5}, expire: []int{0}, remove: []int{3}, want: [series.MaxKinds]int{3: 2}, wantLen: 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := series.New()
			var refs []uint32
			for i, k := range tc.kinds {
				last := int64(100)
				if slices.Contains(tc.expire, i) {
					last = 1
				}
				refs = append(refs, s.Create(k, lbl("__name__", "m", "id", fmt.Sprint(i)), "", 1, last))
			}
			s.Expire(50, nil)
			for _, i := range tc.remove {
				s.Remove(refs[i])
			}
			if s.Len() != tc.wantLen {
				t.Errorf("Len() = %d, want %d", s.Len(), tc.wantLen)
			}
			for k := range series.Kind(series.MaxKinds) {
				if got := s.Count(k); got != tc.want[k] {
					t.Errorf("Count(%d) = %d, want %d", k, got, tc.want[k])
				}
			}
			for i, ref := range refs {
				want := tc.kinds[i]
				if slices.Contains(tc.expire, i) || slices.Contains(tc.remove, i) {
					want = series.Free
				}
				if got := s.Kind(ref); got != want {
					t.Errorf("Kind(%d) = %d, want %d", ref, got, want)
				}
			}
			if got := s.Kind(uint32(len(refs) + 10)); got != series.Free {
				t.Errorf("Kind of a ref past the end = %d, want Free", got)
			}
		})
	}
}

func TestInstallRebuild(t *testing.T) {
	s := series.New()
	s.Grow(6)
	decls := []struct {
		ref  uint32
		kind series.Kind
		ls   []metrics.Label
	}{
		{3, 2, lbl("__name__", "a_bytes", "pod", "p3")},
		{0, 1, lbl("__name__", "a_bytes", "pod", "p0")},
		{5, 4, lbl("__name__", "b_bytes", "pod", "p5")},
	}
	for _, d := range decls {
		s.Install(d.ref, d.kind, d.ls, "", 100+int64(d.ref), s.Hash(d.ls))
	}
	s.Rebuild()
	if s.Slots() != 6 || s.Len() != 3 {
		t.Fatalf("after installing at 3, 0, 5 of 6: Slots %d, Len %d, want 6, 3", s.Slots(), s.Len())
	}
	for _, d := range decls {
		if ref := mustLookup(t, s, d.ls); ref != d.ref || s.Kind(ref) != d.kind {
			t.Errorf("Lookup(%s) = %d of kind %d, want %d of kind %d", key(d.ls), ref, s.Kind(ref), d.ref, d.kind)
		}
		if got := key(s.Labels(nil, d.ref)); got != key(d.ls) {
			t.Errorf("Labels(%d) = %s, want %s", d.ref, got, key(d.ls))
		}
	}
	// The free refs, lowest first, then new ones.
	for i, want := range []uint32{1, 2, 4, 6, 7} {
		if got := s.Create(1, lbl("__name__", "c_bytes", "id", fmt.Sprint(i)), "", 1, 1); got != want {
			t.Errorf("Create #%d after Rebuild = ref %d, want %d", i, got, want)
		}
	}
	// Installing at the first ref past the highest needs no Grow.
	ls := lbl("__name__", "d_bytes")
	s.Install(8, 3, ls, "", 1, s.Hash(ls))
	if ref, ok := s.Lookup(ls); !ok || ref != 8 || s.Slots() != 9 {
		t.Errorf("Install at 8: Lookup = %d, %v, Slots %d, want 8, true, 9", ref, ok, s.Slots())
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Install over a live ref did not panic")
			}
		}()
		ls := lbl("__name__", "e_bytes")
		s.Install(3, 1, ls, "", 1, s.Hash(ls))
	}()
}

func TestRestoreZero(t *testing.T) {
	const created = 1000
	tests := []struct {
		name        string
		install     bool // restored from persisted state, else Create
		pushed      int64
		delivered   int64
		wantCreated int64
		wantMay     bool
	}{
		{name: "new series", delivered: 5000, wantCreated: created},
		{name: "restored, never pushed", install: true, delivered: 5000, wantCreated: created},
		{name: "restored, pushed and delivered", install: true, pushed: 4000, delivered: 4000},
		{name: "restored, pushed, maybe delivered", install: true, pushed: 4001, delivered: 4000, wantCreated: created, wantMay: true},
		{name: "created, pushed and delivered", pushed: 3000, delivered: 3000},
		{name: "created, pushed after delivered", pushed: 3001, delivered: 3000, wantCreated: created},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := series.New()
			ls := lbl("__name__", "a_bytes", "pod", "p1")
			var ref uint32
			if tc.install {
				s.Install(0, 1, ls, "a_packets", created, s.Hash(ls))
				s.Rebuild()
				s.Restore(0, 10, 2, 77, tc.pushed)
				if b, p := s.Counts(0); b != 10 || p != 2 {
					t.Errorf("Counts after Restore = %d, %d, want 10, 2", b, p)
				}
			} else {
				ref = s.Create(1, ls, "a_packets", created, 77)
				s.SetPushed(ref, tc.pushed)
			}
			if got := s.Pushed(ref); got != tc.pushed {
				t.Errorf("Pushed = %d, want %d", got, tc.pushed)
			}
			c, m := s.Zero(ref, tc.delivered)
			if c != tc.wantCreated || m != tc.wantMay {
				t.Errorf("Zero(delivered %d) = %d, %v, want %d, %v", tc.delivered, c, m, tc.wantCreated, tc.wantMay)
			}
			// SetPushed never moves a first push already recorded.
			if tc.pushed != 0 {
				s.SetPushed(ref, tc.pushed+1)
				if got := s.Pushed(ref); got != tc.pushed {
					t.Errorf("SetPushed over %d: Pushed = %d", tc.pushed, got)
				}
			}
		})
	}
}

func TestCaptureRecordsFirstPush(t *testing.T) {
	s := series.New()
	a := s.Create(1, lbl("__name__", "a_bytes"), "", 10, 1)
	c, newly := s.Capture(100, 0)
	if c.Len() != 1 || !newly || s.Pushed(a) != 100 {
		t.Fatalf("first capture: Len %d, newly %v, Pushed %d, want 1, true, 100", c.Len(), newly, s.Pushed(a))
	}
	c, newly = s.Capture(200, 0)
	if c.Len() != 1 || newly || s.Pushed(a) != 100 {
		t.Fatalf("second capture: Len %d, newly %v, Pushed %d, want 1, false, 100", c.Len(), newly, s.Pushed(a))
	}
	b := s.Create(1, lbl("__name__", "b_bytes"), "", 150, 1)
	if _, newly = s.Capture(300, 0); !newly || s.Pushed(b) != 300 || s.Pushed(a) != 100 {
		t.Errorf("third capture: newly %v, Pushed(b) %d, Pushed(a) %d, want true, 300, 100", newly, s.Pushed(b), s.Pushed(a))
	}
}

func TestHashCollision(t *testing.T) {
	// Three label sets declared under one hash, as a 64-bit collision
	// would have them.
	const h = 42
	s := series.New()
	ls := [][]metrics.Label{
		lbl("__name__", "c_bytes", "pod", "p1"),
		lbl("__name__", "c_bytes", "pod", "p2"),
		lbl("__name__", "c_bytes", "pod", "p3"),
	}
	for i, l := range ls {
		s.Install(uint32(i), 1, l, "", 1, h)
		s.Restore(uint32(i), 0, 0, int64(10*(i+1)), 0)
	}
	s.Rebuild()
	check := func(step string, live ...int) {
		t.Helper()
		for i, l := range ls {
			ref, ok := s.LookupHashed(l, h)
			want := slices.Contains(live, i)
			if ok != want || (ok && ref != uint32(i)) {
				t.Errorf("%s: LookupHashed(%s) = %d, %v, want %d, %v", step, key(l), ref, ok, i, want)
			}
		}
		if s.Len() != len(live) {
			t.Errorf("%s: Len() = %d, want %d", step, s.Len(), len(live))
		}
	}
	check("installed", 0, 1, 2)
	s.Remove(1)
	check("the middle one removed", 0, 2)
	s.Expire(15, nil) // the first, which the index holds by its hash
	check("the first one expired", 2)
	s.Install(1, 2, ls[1], "", 1, h)
	s.Rebuild()
	check("the middle one back", 1, 2)
	s.Remove(2)
	s.Remove(1)
	check("all out")
}

func TestLabelsRoundTrip(t *testing.T) {
	tests := [][]metrics.Label{
		lbl("__name__", "a_bytes"),
		lbl("__name__", "a_bytes", "dst_pod", "db-0", "dst_zone", "b", "src_pod", "web-1", "src_zone", "a"),
		lbl("__name__", "x", "a", "1", "b", "2", "c", "3", "d", "4", "e", "5", "f", "6", "g", "7", "h", "8", "i", "9", "j", "10", "k", "11", "l", "12", "m", "13"),
	}
	s := series.New()
	var refs []uint32
	for _, ls := range tests {
		in := slices.Clone(ls)
		refs = append(refs, s.Create(1, in, "p", 1, 1))
		// The caller may reuse its slice.
		for i := range in {
			in[i] = metrics.Label{Name: "zz", Value: "garbage"}
		}
	}
	prefix := lbl("keep", "me")
	for i, ls := range tests {
		got := s.Labels(slices.Clone(prefix), refs[i])
		if want := append(slices.Clone(prefix), ls...); key(got) != key(want) {
			t.Errorf("Labels(%d) = %s, want %s", refs[i], key(got), key(want))
		}
	}
}

// viewed returns what v.Each gives, labels copied.
func viewed(v *series.View) []series.Series {
	var out []series.Series
	v.Each(func(s *series.Series) {
		c := *s
		c.Labels = slices.Clone(s.Labels)
		out = append(out, c)
	})
	return out
}

func TestViewEach(t *testing.T) {
	s := series.New()
	a := s.Create(1, lbl("__name__", "a_bytes", "pod", "p1"), "a_packets", 100, 10)
	b := s.Create(2, lbl("__name__", "b_bytes", "pod", "p2"), "", 200, 20)
	c := s.Create(3, lbl("__name__", "c_bytes"), "", 300, 5)
	d := s.Create(3, lbl("__name__", "d_bytes", "pod", "p1"), "", 400, 15)
	s.Add(a, 7, 1, 30)
	s.Capture(1000, 0)
	s.Expire(8, nil) // c
	v := s.View()
	want := []series.Series{
		{Ref: a, Kind: 1, Created: 100, Last: 30, Pushed: 1000, Bytes: 7, Packets: 1, Labels: lbl("__name__", "a_bytes", "pod", "p1")},
		{Ref: b, Kind: 2, Created: 200, Last: 20, Pushed: 1000, Labels: lbl("__name__", "b_bytes", "pod", "p2")},
		{Ref: d, Kind: 3, Created: 400, Last: 15, Pushed: 1000, Labels: lbl("__name__", "d_bytes", "pod", "p1")},
	}
	// Changes after the view do not show in it; while it is open, no
	// series it holds is freed, even once its stale marker is written.
	s.Add(a, 1000, 1000, 40)
	s.Expire(16, nil) // d
	s.Capture(1100, 0)
	s.Capture(1200, 0)
	if e := s.Create(4, lbl("__name__", "e_bytes"), "", 1, 1); e != 4 {
		t.Errorf("Create with c and d expired two captures ago, a view open: ref %d, want a new one (4)", e)
	}
	// a_bytes, pod=p1, a_packets, b_bytes, pod=p2, c_bytes, d_bytes, e_bytes.
	if got := s.Symbols(); got != 8 {
		t.Errorf("Symbols() with c and d held by the view = %d, want 8", got)
	}
	if v.Len() != 3 || v.Slots() != 4 {
		t.Errorf("View: Len %d, Slots %d, want 3, 4", v.Len(), v.Slots())
	}
	got := viewed(v)
	if len(got) != len(want) {
		t.Fatalf("View.Each gave %d series, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		if !sameSeries(&got[i], &want[i], want[i].Labels) {
			t.Errorf("series %d: %+v, want %+v", i, got[i], want[i])
		}
	}

	// Once unpinned (twice: the second does nothing), the next capture
	// frees c and d.
	s.Unpin(v)
	s.Unpin(v)
	s.Capture(1300, 0)
	if got := s.Symbols(); got != 6 {
		t.Errorf("Symbols() after the view closed and a capture = %d, want 6", got)
	}
	f := s.Create(1, lbl("__name__", "f_bytes"), "", 1, 1)
	g := s.Create(1, lbl("__name__", "g_bytes"), "", 1, 1)
	if refs := sorted([]uint32{f, g}); !slices.Equal(refs, []uint32{c, d}) {
		t.Errorf("Create twice after the view closed and a capture: refs %v, want c's and d's %v", refs, []uint32{c, d})
	}
	defer func() {
		if recover() == nil {
			t.Error("View.Each after Unpin did not panic")
		}
	}()
	v.Each(func(*series.Series) {})
}

// TestViewPinsWhatItHolds checks View's promise that no series it holds
// is freed, its ref or symbols reused, until Unpin, for the series a
// capture frees at once: expired before any capture wrote them, or
// superseded by a live series with their labels.
func TestViewPinsWhatItHolds(t *testing.T) {
	tests := []struct {
		name       string
		captured   bool // the series was in a capture before the view
		supersede  bool // re-created before the capture after its expiry
		otherAfter bool // another series is created after that capture
	}{
		{name: "expired before its first capture", otherAfter: true},
		{name: "expired before its first capture, nothing created"},
		{name: "superseded", captured: true, supersede: true, otherAfter: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := series.New()
			ls := lbl("__name__", "a_bytes", "pod", "p1")
			a := s.Create(1, ls, "a_packets", 1, 1)
			if tc.captured {
				s.Capture(100, 0)
			}
			v := s.View()
			s.Expire(10, nil)
			if tc.supersede {
				s.Create(1, ls, "a_packets", 1, 20)
			}
			s.Capture(200, 0)
			if tc.otherAfter {
				if b := s.Create(2, lbl("__name__", "b_bytes", "zone", "z9"), "", 1, 30); b == a {
					t.Errorf("Create after the capture reused ref %d, which the open view holds", a)
				}
			}
			got := viewed(v)
			if len(got) != 1 || got[0].Ref != a || key(got[0].Labels) != key(ls) {
				t.Errorf("View.Each = %+v, want ref %d labelled %s", got, a, key(ls))
			}
		})
	}
}

// collisionName is the __name__ of the label sets the model driver
// declares under one shared hash (collisionHash), through Install only:
// Create hashes with Hash, and the two must not meet for one label set.
const (
	collisionName        = "c_bytes"
	collisionHash uint64 = 0xc011
)

// plainProbes are the label sets the driver declares with Create or
// Install under Hash: a small alphabet, so that label sets repeat and
// labels are shared.
var plainProbes = func() [][]metrics.Label {
	var out [][]metrics.Label
	for _, name := range []string{"a_bytes", "b_bytes"} {
		for _, dst := range []string{"", "p1"} {
			for _, pod := range []string{"", "p1", "p2"} {
				for _, zone := range []string{"", "z1", "z2"} {
					ls := lbl("__name__", name)
					for _, l := range []metrics.Label{{Name: "dst", Value: dst}, {Name: "pod", Value: pod}, {Name: "zone", Value: zone}} {
						if l.Value != "" {
							ls = append(ls, l)
						}
					}
					out = append(out, ls)
				}
			}
		}
	}
	return out
}()

// collidingProbes are the label sets the driver declares, with Install
// only, under collisionHash.
var collidingProbes = [][]metrics.Label{
	lbl("__name__", collisionName, "pod", "p1"),
	lbl("__name__", collisionName, "pod", "p1", "zone", "z1"),
	lbl("__name__", collisionName, "pod", "p2"),
	lbl("__name__", collisionName, "pod", "p2", "zone", "z1"),
}

// probes are all the label sets the driver declares and looks up.
var probes = append(slices.Clone(plainProbes), collidingProbes...)

// packetsNames are the twins' packets names: none, one of its own, and
// the bytes name of other series (one symbol for both).
var packetsNames = []string{"", "a_packets", "b_bytes"}

// hashOf returns the hash the driver declares ls under.
func hashOf(s *series.Store, ls []metrics.Label) uint64 {
	if ls[0].Value == collisionName {
		return collisionHash
	}
	return s.Hash(ls)
}

type mstate uint8

const (
	mLive  mstate = iota + 1
	mDying        // expired, its stale marker (if due) not captured yet
	mStale        // its stale marker captured; freed by the next capture
	mHeld         // would be freed, but a view was open at that capture
)

// mrec is the model of one series record.
type mrec struct {
	state          mstate
	kind           series.Kind
	labels         []metrics.Label
	pname          string
	bytes, packets uint64
	last           int64
	created        int64
	pushed         int64
	sent           bool // in a capture already
	restored       bool // Install'd
}

// model is what the package documents, kept the plainest way: records by
// ref in a map (a ref absent and below slots is free), the live ones by
// their label string.
type model struct {
	// copying: the driver holds a view not filled yet.
	copying bool
	recs    map[uint32]*mrec
	live    map[string]uint32
	slots   int
	lastTS  int64
	// ordered: Rebuild ran and no ref was freed since, so free refs are
	// handed out lowest first.
	ordered bool
	// pins counts the views open.
	pins int
}

func newModel() *model {
	return &model{recs: map[uint32]*mrec{}, live: map[string]uint32{}}
}

// freeRefs returns the free refs, ascending.
func (m *model) freeRefs() []uint32 {
	var out []uint32
	for ref := range uint32(m.slots) {
		if m.recs[ref] == nil {
			out = append(out, ref)
		}
	}
	return out
}

// liveRefs returns the refs of the live series, ascending.
func (m *model) liveRefs() []uint32 {
	out := make([]uint32, 0, len(m.live))
	for _, ref := range m.live {
		out = append(out, ref)
	}
	return sorted(out)
}

// nonFree returns the refs of every record not free, ascending.
func (m *model) nonFree() []uint32 {
	out := make([]uint32, 0, len(m.recs))
	for ref := range m.recs {
		out = append(out, ref)
	}
	return sorted(out)
}

// allocOK checks the ref Create picked: a free one while there is one
// (the lowest right after Rebuild), else the first past the highest.
func (m *model) allocOK(ref uint32) error {
	free := m.freeRefs()
	switch {
	case len(free) == 0 && ref != uint32(m.slots):
		return fmt.Errorf("Create gave ref %d, want %d (no free ref)", ref, m.slots)
	case len(free) > 0 && !slices.Contains(free, ref):
		return fmt.Errorf("Create gave ref %d, want one of the free refs %v", ref, free)
	case len(free) > 0 && m.ordered && ref != free[0]:
		return fmt.Errorf("Create after Rebuild gave ref %d, want the lowest free ref %d", ref, free[0])
	}
	return nil
}

func (m *model) declare(ref uint32, r *mrec) {
	r.state = mLive
	m.recs[ref] = r
	m.live[key(r.labels)] = ref
	m.slots = max(m.slots, int(ref)+1)
}

func (m *model) create(ref uint32, k series.Kind, ls []metrics.Label, pname string, created, last int64) {
	m.declare(ref, &mrec{kind: k, labels: slices.Clone(ls), pname: pname, created: created, last: last})
}

func (m *model) install(ref uint32, k series.Kind, ls []metrics.Label, pname string, created int64) {
	m.declare(ref, &mrec{kind: k, labels: slices.Clone(ls), pname: pname, created: created, restored: true})
}

func (m *model) free(ref uint32) {
	delete(m.recs, ref)
	m.ordered = false
}

// expire returns the refs expired, ascending.
func (m *model) expire(cutoff int64) []uint32 {
	var dead []uint32
	for _, ref := range m.liveRefs() {
		if r := m.recs[ref]; r.last < cutoff {
			r.state = mDying
			delete(m.live, key(r.labels))
			dead = append(dead, ref)
		}
	}
	return dead
}

func (m *model) capture(ts int64) (n int, newly bool) {
	// Series whose stale markers are written go, once no view is open.
	for _, ref := range m.nonFree() {
		r := m.recs[ref]
		if r.state == mStale {
			r.state = mHeld
		}
		if r.state == mHeld && m.pins == 0 {
			m.free(ref)
		}
	}
	m.lastTS = ts
	for _, ref := range m.liveRefs() {
		r := m.recs[ref]
		r.sent = true
		if r.pushed == 0 {
			r.pushed, newly = ts, true
		}
		n++
	}
	for _, ref := range m.nonFree() {
		r := m.recs[ref]
		if r.state != mDying {
			continue
		}
		_, superseded := m.live[key(r.labels)]
		switch {
		case r.sent && !superseded:
			r.state = mStale
		case m.pins > 0:
			r.state = mHeld // a view may hold it
		default:
			m.free(ref)
		}
	}
	return n, newly
}

func (m *model) remove(ref uint32) {
	if r := m.recs[ref]; r != nil && r.state == mLive {
		delete(m.live, key(r.labels))
		m.free(ref)
	}
}

func (m *model) drop() {
	for _, ref := range m.nonFree() {
		if m.recs[ref].state != mLive {
			m.free(ref)
		}
	}
}

func (m *model) zero(ref uint32, delivered int64) (int64, bool) {
	r := m.recs[ref]
	if r.pushed != 0 && r.pushed <= delivered {
		return 0, false
	}
	return r.created, r.restored && r.pushed != 0
}

// symbols counts the distinct labels of the records not freed.
func (m *model) symbols() int {
	set := map[metrics.Label]bool{}
	for _, r := range m.recs {
		for _, l := range r.labels {
			set[l] = true
		}
		if r.pname != "" {
			set[metrics.Label{Name: "__name__", Value: r.pname}] = true
		}
	}
	return len(set)
}

// check compares everything the store reports with the model.
func (m *model) check(s *series.Store) error {
	var errs []string
	fail := func(format string, args ...any) { errs = append(errs, fmt.Sprintf(format, args...)) }
	if s.Len() != len(m.live) {
		fail("Len() = %d, want %d", s.Len(), len(m.live))
	}
	if s.Slots() != m.slots {
		fail("Slots() = %d, want %d", s.Slots(), m.slots)
	}
	if got, want := s.Symbols(), m.symbols(); got != want {
		fail("Symbols() = %d, want %d", got, want)
	}
	var perKind [series.MaxKinds]int
	unpushed := 0
	for _, ref := range m.live {
		perKind[m.recs[ref].kind]++
		if m.recs[ref].pushed == 0 {
			unpushed++
		}
	}
	if got := s.Unpushed(); got != unpushed {
		fail("Unpushed() = %d, want %d live series never pushed", got, unpushed)
	}
	for k := range series.Kind(series.MaxKinds) {
		if s.Count(k) != perKind[k] {
			fail("Count(%d) = %d, want %d", k, s.Count(k), perKind[k])
		}
	}
	var eachLive []uint32
	s.EachLive(func(ref uint32) { eachLive = append(eachLive, ref) })
	if want := m.liveRefs(); !slices.Equal(eachLive, want) {
		fail("EachLive gave %v, want %v", eachLive, want)
	}
	prefix := lbl("pre", "fix")
	var g series.Series
	for ref := range uint32(m.slots) {
		r := m.recs[ref]
		want := series.Free
		if r != nil && r.state == mLive {
			want = r.kind
		}
		if got := s.Kind(ref); got != want {
			fail("Kind(%d) = %d, want %d", ref, got, want)
		}
		if want == series.Free {
			continue
		}
		if b, p := s.Counts(ref); b != r.bytes || p != r.packets {
			fail("Counts(%d) = %d, %d, want %d, %d", ref, b, p, r.bytes, r.packets)
		}
		if got := s.Labels(slices.Clone(prefix), ref); key(got) != key(append(slices.Clone(prefix), r.labels...)) {
			fail("Labels(%d) = %s, want %s after the prefix", ref, key(got), key(r.labels))
		}
		if s.Pushed(ref) != r.pushed {
			fail("Pushed(%d) = %d, want %d", ref, s.Pushed(ref), r.pushed)
		}
		s.Get(ref, &g)
		if w := (series.Series{Ref: ref, Kind: r.kind, Created: r.created, Last: r.last, Pushed: r.pushed, Bytes: r.bytes, Packets: r.packets}); !sameSeries(&g, &w, r.labels) {
			fail("Get(%d) = %+v, want %+v labelled %s", ref, g, w, key(r.labels))
		}
	}
	for _, ls := range probes {
		wantRef, wantOK := m.live[key(ls)]
		ref, ok := s.LookupHashed(ls, hashOf(s, ls))
		if ok != wantOK || (ok && ref != wantRef) {
			fail("LookupHashed(%s) = %d, %v, want %d, %v", key(ls), ref, ok, wantRef, wantOK)
		}
		if ls[0].Value == collisionName {
			continue // declared under another hash than Hash's
		}
		if ref, ok := s.Lookup(ls); ok != wantOK || (ok && ref != wantRef) {
			fail("Lookup(%s) = %d, %v, want %d, %v", key(ls), ref, ok, wantRef, wantOK)
		}
	}
	// A view of its own would end the copy of one the driver started.
	if !m.copying {
		v := s.View()
		defer s.Unpin(v)
		if v.Len() != len(m.live) || v.Slots() != m.slots {
			fail("View: Len %d, Slots %d, want %d, %d", v.Len(), v.Slots(), len(m.live), m.slots)
		}
		if err := sameView(v, m.snapshot()); err != nil {
			fail("%v", err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "\n"))
	}
	return nil
}

// snapshot returns the live series as a View should give them.
func (m *model) snapshot() []series.Series {
	var out []series.Series
	for _, ref := range m.liveRefs() {
		r := m.recs[ref]
		out = append(out, series.Series{Ref: ref, Kind: r.kind, Created: r.created, Last: r.last, Pushed: r.pushed,
			Bytes: r.bytes, Packets: r.packets, Labels: slices.Clone(r.labels)})
	}
	return out
}

// sameView compares what v gives with want.
func sameView(v *series.View, want []series.Series) error {
	if v.Len() != len(want) {
		return fmt.Errorf("View.Len() = %d, want %d", v.Len(), len(want))
	}
	var errs []string
	i := 0
	v.Each(func(g *series.Series) {
		defer func() { i++ }()
		if i >= len(want) {
			errs = append(errs, fmt.Sprintf("View.Each: extra series %+v", *g))
			return
		}
		if !sameSeries(g, &want[i], want[i].Labels) {
			errs = append(errs, fmt.Sprintf("View.Each #%d = %+v, want %+v", i, *g, want[i]))
		}
	})
	if i < len(want) {
		errs = append(errs, fmt.Sprintf("View.Each gave %d series, want %d", i, len(want)))
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "\n"))
	}
	return nil
}

// sameSeries compares g with w, whose labels are ls.
func sameSeries(g, w *series.Series, ls []metrics.Label) bool {
	if key(g.Labels) != key(ls) {
		return false
	}
	return g.Ref == w.Ref && g.Kind == w.Kind && g.Created == w.Created && g.Last == w.Last &&
		g.Pushed == w.Pushed && g.Bytes == w.Bytes && g.Packets == w.Packets
}

// maxOps bounds a driver run, so that a fuzz execution stays fast.
const maxOps = 200

// opReader hands out the driver's input a byte at a time, zeros past
// its end.
type opReader struct{ data []byte }

func (r *opReader) more() bool { return len(r.data) > 0 }

func (r *opReader) next() byte {
	if len(r.data) == 0 {
		return 0
	}
	b := r.data[0]
	r.data = r.data[1:]
	return b
}

func (r *opReader) pick(n int) int { return int(r.next()) % n }

// openView is a view the driver holds across operations, with what it
// must keep giving.
type openView struct {
	v         *series.View
	want      []series.Series
	pending   bool // started, not filled yet
	fillAfter int  // the operation after which it may be filled
}

// runOps drives a store and the model through the operations data
// encodes, comparing them after each. It skips operations the contract
// forbids (declaring labels already live, Add to a series not live,
// replay's Remove and Drop with a view open).
func runOps(t testing.TB, data []byte) {
	s := series.New()
	m := newModel()
	r := &opReader{data: data}
	var trace []string
	var views []openView
	stamps := []int64{0}
	fatal := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("after %s:\n%s", strings.Join(trace, "; "), fmt.Sprintf(format, args...))
	}
	pickLive := func() (uint32, bool) {
		live := m.liveRefs()
		if len(live) == 0 {
			return 0, false
		}
		return live[r.pick(len(live))], true
	}
	for n := 0; n < maxOps && r.more(); n++ {
		switch op := r.next() % 13; op {
		case 0, 1, 2: // create, or add when the labels are live
			ls := plainProbes[r.pick(len(plainProbes))]
			k := series.Kind(1 + r.pick(series.MaxKinds-1))
			pname := packetsNames[r.pick(len(packetsNames))]
			created, last := int64(r.next()), int64(r.next())
			if ref, ok := m.live[key(ls)]; ok {
				trace = append(trace, fmt.Sprintf("add(%d,1,1,%d)", ref, last))
				s.Add(ref, 1, 1, last)
				m.recs[ref].bytes++
				m.recs[ref].packets++
				m.recs[ref].last = last
				break
			}
			ref := s.Create(k, ls, pname, created, last)
			trace = append(trace, fmt.Sprintf("create(%d,%s,%q,%d,%d)=%d", k, key(ls), pname, created, last, ref))
			if err := m.allocOK(ref); err != nil {
				fatal("%v", err)
			}
			m.create(ref, k, ls, pname, created, last)
		case 3: // add
			ref, ok := pickLive()
			if !ok {
				break
			}
			b, p, ts := uint64(r.next())<<8, uint64(r.next()), int64(r.next())
			trace = append(trace, fmt.Sprintf("add(%d,%d,%d,%d)", ref, b, p, ts))
			s.Add(ref, b, p, ts)
			m.recs[ref].bytes += b
			m.recs[ref].packets += p
			m.recs[ref].last = ts
		case 4: // expire
			cutoff := int64(r.next())
			trace = append(trace, fmt.Sprintf("expire(%d)", cutoff))
			dead := s.Expire(cutoff, []uint32{1 << 31})
			want := m.expire(cutoff)
			if len(dead) == 0 || dead[0] != 1<<31 || !slices.Equal(sorted(dead[1:]), want) {
				fatal("Expire(%d, [%d]) = %v, want it followed by %v", cutoff, uint32(1<<31), dead, want)
			}
		case 5: // capture
			ts := m.lastTS + 1 + int64(r.pick(3))
			delivered := stamps[r.pick(len(stamps))]
			for _, ref := range m.liveRefs() {
				gc, gm := s.Zero(ref, delivered)
				if wc, wm := m.zero(ref, delivered); gc != wc || gm != wm {
					fatal("Zero(%d, %d) = %d, %v, want %d, %v", ref, delivered, gc, gm, wc, wm)
				}
			}
			trace = append(trace, fmt.Sprintf("capture(%d,%d)", ts, delivered))
			c, newly := s.Capture(ts, delivered)
			wn, wnewly := m.capture(ts)
			if c.Len() != wn || newly != wnewly {
				fatal("Capture(%d): Len %d, newly %v, want %d, %v", ts, c.Len(), newly, wn, wnewly)
			}
			stamps = append(stamps, ts)
		case 6: // remove, a no-op unless live
			if m.slots == 0 || len(views) > 0 {
				break
			}
			ref := uint32(r.pick(m.slots))
			trace = append(trace, fmt.Sprintf("remove(%d)", ref))
			s.Remove(ref)
			m.remove(ref)
		case 7: // install (+ restore), then rebuild
			ls := probes[r.pick(len(probes))]
			k := series.Kind(1 + r.pick(series.MaxKinds-1))
			pname := packetsNames[r.pick(len(packetsNames))]
			created := int64(r.next())
			how, b := r.next(), r.next()
			if _, ok := m.live[key(ls)]; ok {
				break
			}
			var ref uint32
			free := m.freeRefs()
			switch {
			case how%3 == 1 && len(free) > 0:
				ref = free[int(b)%len(free)]
			case how%3 == 2:
				ref = uint32(m.slots + int(b)%3)
				s.Grow(int(ref))
				m.slots = max(m.slots, int(ref))
			default:
				ref = uint32(m.slots)
			}
			trace = append(trace, fmt.Sprintf("install(%d,%d,%s,%q,%d)", ref, k, key(ls), pname, created))
			s.Install(ref, k, ls, pname, created, hashOf(s, ls))
			m.install(ref, k, ls, pname, created)
			if how&4 != 0 {
				last, pushed := int64(b), stamps[int(how>>3)%len(stamps)]
				trace = append(trace, fmt.Sprintf("restore(%d,%d,%d,%d,%d)", ref, b, b/2, last, pushed))
				s.Restore(ref, uint64(b), uint64(b/2), last, pushed)
				rec := m.recs[ref]
				rec.bytes, rec.packets, rec.last, rec.pushed = uint64(b), uint64(b/2), last, pushed
			}
			s.Rebuild()
			m.ordered = true
		case 8: // drop
			if len(views) > 0 {
				break
			}
			trace = append(trace, "drop")
			s.Drop()
			m.drop()
		case 9: // set the first push
			if m.slots == 0 {
				break
			}
			ref := uint32(r.pick(m.slots))
			ts := stamps[r.pick(len(stamps))]
			trace = append(trace, fmt.Sprintf("setPushed(%d,%d)", ref, ts))
			s.SetPushed(ref, ts)
			if rec := m.recs[ref]; rec != nil && rec.state == mLive && rec.pushed == 0 {
				rec.pushed = ts
			}
		case 10: // open a view, held across operations
			if len(views) == 2 {
				break
			}
			if r.next()%2 == 0 {
				trace = append(trace, "view")
				views = append(views, openView{v: s.View(), want: m.snapshot()})
			} else {
				// Copied later (op 12): the changes meanwhile must not
				// show. Starting it ends the copy of another.
				trace = append(trace, "startView")
				for i := range views {
					views[i].pending = false
				}
				views = append(views, openView{v: s.StartView(), want: m.snapshot(), pending: true, fillAfter: n + 1})
			}
			m.pins++
		case 11: // close a view
			if len(views) == 0 {
				break
			}
			i := r.pick(len(views))
			trace = append(trace, fmt.Sprintf("unpin(%d)", i))
			s.Unpin(views[i].v)
			s.Unpin(views[i].v) // does nothing
			views = slices.Delete(views, i, i+1)
			m.pins--
		case 12: // copy a view started earlier
			for i := range views {
				if views[i].pending {
					trace = append(trace, fmt.Sprintf("fill(%d)", i))
					views[i].v.Fill(s, &sync.Mutex{})
					views[i].pending = false
				}
			}
		}
		m.copying = slices.ContainsFunc(views, func(ov openView) bool { return ov.pending })
		if err := m.check(s); err != nil {
			fatal("%v", err)
		}
		for i := range views {
			// Every other one right after the next operation: whatever it
			// changes is the first change the copy must not see.
			if ov := &views[i]; ov.pending && ov.fillAfter == n && n%2 == 0 {
				trace = append(trace, fmt.Sprintf("fill(%d)", i))
				ov.v.Fill(s, &sync.Mutex{})
				ov.pending = false
			}
		}
		for i, ov := range views {
			if ov.pending {
				continue
			}
			if err := sameView(ov.v, ov.want); err != nil {
				fatal("view %d, open since it was taken: %v", i, err)
			}
		}
	}
}

// TestStoreModel runs the driver on random operations.
func TestStoreModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	runs := 100
	if testing.Short() {
		runs = 30
	}
	for i := range runs {
		data := make([]byte, 100+rng.IntN(700))
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		t.Run(fmt.Sprint(i), func(t *testing.T) { runOps(t, data) })
		if t.Failed() {
			return
		}
	}
}
