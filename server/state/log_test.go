package state

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/prometheus/tsdb/wlog"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
)

// pageSize is wlog's page: records are split into fragments at its
// boundaries, which is where torn tails are most interesting.
const pageSize = wlogPageSize

// testRecord is record i of a test log, size bytes long (at least 16):
// it starts with "<iiiiii|" and ends with "|iiiiii>", so that the test can
// find where each record lies in a segment file without parsing wlog's
// format, and no two records share a byte string the test looks for.
func testRecord(i, size int) []byte {
	b := make([]byte, size)
	copy(b, fmt.Sprintf("<%06d|", i))
	for j := 8; j < size-8; j++ {
		b[j] = 'a' + byte((i*7+j)%26)
	}
	copy(b[size-8:], fmt.Sprintf("|%06d>", i))
	return b
}

// testRecords returns n records whose sizes cycle through sizes.
func testRecords(first, n int, sizes ...int) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		out[i] = testRecord(first+i, sizes[i%len(sizes)])
	}
	return out
}

func openTestLog(t testing.TB, dir string, segSize int) (*Log, *metrics.Registry) {
	t.Helper()
	reg := metrics.New()
	l, err := OpenLog(LogOptions{Dir: dir, SegmentSize: segSize, Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, reg
}

// replayAll replays l from segment first and returns copies of the
// records.
func replayAll(t testing.TB, l *Log, first int) ([][]byte, ReplayStats) {
	t.Helper()
	var got [][]byte
	st, err := l.Replay(first, func(rec []byte) error {
		got = append(got, slices.Clone(rec))
		return nil
	})
	if err != nil {
		t.Fatalf("replay from segment %d: %v", first, err)
	}
	if st.Records != len(got) {
		t.Errorf("stats say %d records, fn saw %d", st.Records, len(got))
	}
	return got, st
}

// appendWait appends recs and waits for the last one.
func appendWait(t testing.TB, l *Log, recs [][]byte) uint64 {
	t.Helper()
	var pos uint64
	for _, r := range recs {
		pos = l.Append(slices.Clone(r))
	}
	if err := l.Wait(context.Background(), pos); err != nil {
		t.Fatalf("wait for %d: %v", pos, err)
	}
	return pos
}

// writeLog writes recs to a new log in dir and closes it.
func writeLog(t testing.TB, dir string, segSize int, recs [][]byte) {
	t.Helper()
	l, _ := openTestLog(t, dir, segSize)
	appendWait(t, l, recs)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}

func equalRecords(t testing.TB, what string, got, want [][]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s: %d records, want %d (%s)", what, len(got), len(want), describe(got))
		return
	}
	for i := range got {
		if !bytes.Equal(got[i], want[i]) {
			t.Errorf("%s: record %d differs: %.40q, want %.40q", what, i, got[i], want[i])
			return
		}
	}
}

// isPrefix reports whether got is want[:len(got)], record for record.
func isPrefix(got, want [][]byte) bool {
	if len(got) > len(want) {
		return false
	}
	for i := range got {
		if !bytes.Equal(got[i], want[i]) {
			return false
		}
	}
	return true
}

func describe(recs [][]byte) string {
	var names []string
	for _, r := range recs {
		if len(r) >= 8 {
			names = append(names, string(r[:7])+">")
		} else {
			names = append(names, fmt.Sprintf("%q", r))
		}
	}
	if len(names) > 12 {
		names = append(names[:6], append([]string{"..."}, names[len(names)-6:]...)...)
	}
	return strings.Join(names, " ")
}

func counter(reg *metrics.Registry, name string) float64 {
	v := -1.0
	reg.Each(func(n string, _ []metrics.Label, value float64) {
		if n == name {
			v = value
		}
	})
	return v
}

func segmentPath(dir string, seg int) string {
	return wlog.SegmentName(filepath.Join(dir, walDir), seg)
}

// segmentList returns the log's segment numbers.
func segmentList(t testing.TB, dir string) []int {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, walDir))
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// readSegments reads segments [first, last] with wlog's own reader: the
// test's independent view of which records a segment range holds.
func readSegments(t testing.TB, dir string, first, last int) [][]byte {
	t.Helper()
	if last < first {
		return nil
	}
	sr, err := wlog.NewSegmentsRangeReader(wlog.SegmentRange{Dir: filepath.Join(dir, walDir), First: first, Last: last})
	if err != nil {
		t.Fatal(err)
	}
	defer sr.Close()
	r := wlog.NewReader(sr)
	var out [][]byte
	for r.Next() {
		out = append(out, slices.Clone(r.Record()))
	}
	if err := r.Err(); err != nil {
		t.Fatalf("reading segments %d-%d: %v", first, last, err)
	}
	return out
}

func TestLogAppendWaitOrder(t *testing.T) {
	dir := t.TempDir()
	l, _ := openTestLog(t, dir, 0)
	if got, _ := replayAll(t, l, 0); len(got) != 0 {
		t.Fatalf("new log replays %d records", len(got))
	}
	recs := testRecords(0, 100, 16, 300, 5000, 40_000)
	var pos []uint64
	for _, r := range recs {
		p := l.Append(slices.Clone(r))
		if len(pos) > 0 && p != pos[len(pos)-1]+1 {
			t.Fatalf("position %d after %d: positions must be consecutive", p, pos[len(pos)-1])
		}
		pos = append(pos, p)
	}
	if err := l.Wait(context.Background(), pos[len(pos)-1]); err != nil {
		t.Fatal(err)
	}
	// Durability is a watermark: once the last record is durable, every
	// earlier one is, so waiting for it must not block even with a
	// context that already ended.
	done, cancel := context.WithCancel(context.Background())
	cancel()
	for _, p := range pos {
		if err := l.Wait(done, p); err != nil {
			t.Fatalf("wait for %d after the last one was durable: %v", p, err)
		}
	}
	// A position never appended is never durable: Wait returns the
	// context's error, wrapped.
	if err := l.Wait(done, pos[len(pos)-1]+10); !errors.Is(err, context.Canceled) {
		t.Fatalf("wait for a future position with an ended context: %v, want context.Canceled", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l2, _ := openTestLog(t, dir, 0)
	got, st := replayAll(t, l2, 0)
	equalRecords(t, "replay after reopening", got, recs)
	if st.Repaired {
		t.Errorf("clean log reported repaired: %s", st.Lost)
	}
	var size int64
	for _, r := range recs {
		size += int64(len(r))
	}
	if st.Bytes != size {
		t.Errorf("replay stats: %d bytes, want %d", st.Bytes, size)
	}
}

// TestLogConcurrentAppenders has many goroutines each append and wait for
// its records one at a time, as agents' batches do: every record must be
// durable, in each goroutine's own order, and group commit must have
// needed fewer fsyncs than records.
func TestLogConcurrentAppenders(t *testing.T) {
	const (
		writers = 64
		each    = 200
	)
	dir := t.TempDir()
	l, reg := openTestLog(t, dir, 0)
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				pos := l.Append([]byte(fmt.Sprintf("g%02d i%03d %s", g, i, strings.Repeat("x", (g*31+i)%200))))
				if err := l.Wait(context.Background(), pos); err != nil {
					errs <- fmt.Errorf("writer %d record %d: %w", g, i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	fsyncs := counter(reg, "kubezonnet_server_state_fsyncs_total")
	records := counter(reg, "kubezonnet_server_state_records_total")
	if records != writers*each {
		t.Errorf("records_total = %v, want %d", records, writers*each)
	}
	if fsyncs < 1 || fsyncs > records {
		t.Errorf("fsyncs_total = %v for %v records: group commit must not fsync more than once per record", fsyncs, records)
	}
	t.Logf("%v records in %v fsyncs (%.1f records per fsync)", records, fsyncs, records/fsyncs)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	l2, _ := openTestLog(t, dir, 0)
	got, _ := replayAll(t, l2, 0)
	next := make([]int, writers)
	for _, rec := range got {
		var g, i int
		if _, err := fmt.Sscanf(string(rec), "g%d i%d", &g, &i); err != nil || g < 0 || g >= writers {
			t.Fatalf("record %q does not parse: %v", rec, err)
		}
		if i != next[g] {
			t.Fatalf("writer %d: record %d replayed when %d was expected next", g, i, next[g])
		}
		next[g]++
	}
	for g, n := range next {
		if n != each {
			t.Errorf("writer %d: %d records replayed, want %d", g, n, each)
		}
	}
}

// TestLogCut checks that a cut splits the log between segments: records
// queued before it are in segments before CutPoint.Segment, records after
// it in that segment and later, whatever the rounds the committer made.
func TestLogCut(t *testing.T) {
	for _, tc := range []struct {
		name string
		// parts are the numbers of records between cuts: parts[0]
		// before the first cut, and so on.
		parts   []int
		segSize int
	}{
		{name: "one cut", parts: []int{10, 10}},
		{name: "cut of an empty log", parts: []int{0, 5}},
		{name: "two cuts in a row", parts: []int{3, 0, 4}},
		{name: "cut at the end", parts: []int{7, 0}},
		{name: "many cuts", parts: []int{1, 2, 3, 4, 5, 6}},
		// Small segments: wlog starts segments of its own when one is
		// full, which must not confuse the cut's segment number.
		{name: "segments filling up", parts: []int{30, 30, 30}, segSize: pageSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			l, _ := openTestLog(t, dir, tc.segSize)
			var parts [][][]byte
			var cuts []*CutPoint
			n := 0
			for i, k := range tc.parts {
				if i > 0 {
					cuts = append(cuts, l.Cut())
				}
				recs := testRecords(n, k, 100, 3000, 9000)
				n += k
				for _, r := range recs {
					l.Append(slices.Clone(r))
				}
				parts = append(parts, recs)
			}
			last := l.Append(testRecord(n, 20))
			parts[len(parts)-1] = append(parts[len(parts)-1], testRecord(n, 20))
			if err := l.Wait(context.Background(), last); err != nil {
				t.Fatal(err)
			}
			for i, c := range cuts {
				if err := l.Wait(context.Background(), c.Pos); err != nil {
					t.Fatal(err)
				}
				if i > 0 && c.Segment <= cuts[i-1].Segment {
					t.Fatalf("cut %d at segment %d, after cut %d at segment %d", i, c.Segment, i-1, cuts[i-1].Segment)
				}
			}
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			// Each stretch between two cuts is in the segments between
			// their numbers, read with wlog's reader.
			lastSeg := segmentList(t, dir)
			for i := range parts {
				first, end := 0, lastSeg[len(lastSeg)-1]+1
				if i > 0 {
					first = cuts[i-1].Segment
				}
				if i < len(cuts) {
					end = cuts[i].Segment
				}
				equalRecords(t, fmt.Sprintf("segments %d-%d", first, end-1), readSegments(t, dir, first, end-1), parts[i])
			}
			// Replay from a cut's segment yields exactly what followed it.
			l2, _ := openTestLog(t, dir, tc.segSize)
			for i, c := range cuts {
				got, _ := replayAll(t, l2, c.Segment)
				equalRecords(t, fmt.Sprintf("replay from cut %d", i), got, slices.Concat(parts[i+1:]...))
			}
			got, _ := replayAll(t, l2, 0)
			equalRecords(t, "replay from 0", got, slices.Concat(parts...))
		})
	}
}

func TestLogTruncate(t *testing.T) {
	dir := t.TempDir()
	l, _ := openTestLog(t, dir, 0)
	a, b, c := testRecords(0, 5, 50), testRecords(5, 5, 50), testRecords(10, 5, 50)
	appendWait(t, l, a)
	cut1 := l.Cut()
	appendWait(t, l, b)
	cut2 := l.Cut()
	appendWait(t, l, c)
	if err := l.Wait(context.Background(), cut2.Pos); err != nil {
		t.Fatal(err)
	}
	size, err := l.Size()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Truncate(cut2.Segment); err != nil {
		t.Fatal(err)
	}
	segs := segmentList(t, dir)
	if segs[0] != cut2.Segment {
		t.Fatalf("segments after truncating before %d: %v", cut2.Segment, segs)
	}
	if after, err := l.Size(); err != nil || after >= size {
		t.Errorf("size %d before truncating, %d after (%v)", size, after, err)
	}
	// Truncating again, or before a segment already gone, is harmless.
	if err := l.Truncate(cut1.Segment); err != nil {
		t.Fatal(err)
	}
	// The log keeps working.
	d := testRecords(15, 3, 50)
	appendWait(t, l, d)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l2, _ := openTestLog(t, dir, 0)
	got, _ := replayAll(t, l2, cut2.Segment)
	equalRecords(t, "replay after truncate", got, slices.Concat(c, d))
	// Replay from a truncated segment starts at the oldest one left.
	got, _ = replayAll(t, l2, 0)
	equalRecords(t, "replay from 0 after truncate", got, slices.Concat(c, d))
}

func TestLogClose(t *testing.T) {
	dir := t.TempDir()
	l, _ := openTestLog(t, dir, 0)
	before := testRecords(0, 20, 100, 20_000)
	var pos []uint64
	for _, r := range before {
		pos = append(pos, l.Append(slices.Clone(r)))
	}
	// Close writes what is queued: the records appended before it are
	// durable, even though nobody waited for them.
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	for _, p := range pos {
		if err := l.Wait(context.Background(), p); err != nil {
			t.Fatalf("wait for %d appended before close: %v", p, err)
		}
	}
	// Records appended after Close are never durable: Wait says so
	// rather than blocking.
	late := l.Append(testRecord(99, 30))
	if err := l.Wait(context.Background(), late); !errors.Is(err, ErrClosed) {
		t.Fatalf("wait for a record appended after close: %v, want ErrClosed", err)
	}
	if cp := l.Cut(); l.Wait(context.Background(), cp.Pos) == nil {
		t.Fatal("a cut queued after close reported durable")
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	l2, _ := openTestLog(t, dir, 0)
	got, _ := replayAll(t, l2, 0)
	equalRecords(t, "replay after close", got, before)
}

func TestLogReplayError(t *testing.T) {
	dir := t.TempDir()
	recs := testRecords(0, 10, 40)
	writeLog(t, dir, 0, recs)
	l, _ := openTestLog(t, dir, 0)
	stop := errors.New("stop here")
	n := 0
	_, err := l.Replay(0, func([]byte) error {
		n++
		if n == 4 {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) || n != 4 {
		t.Fatalf("replay returned %v after %d records, want the callback's error after 4", err, n)
	}
	// fn's error is not corruption: nothing was cut.
	got, st := replayAll(t, l, 0)
	equalRecords(t, "replay after a callback error", got, recs)
	if st.Repaired {
		t.Errorf("callback error repaired the log: %s", st.Lost)
	}
}

// span is where a record lies in a segment file: hdr is the offset of its
// first fragment's header, end the offset just past its last byte.
type span struct{ hdr, end int }

// recordSpans finds the records in a segment file by their markers.
func recordSpans(t testing.TB, file []byte, recs [][]byte) []span {
	t.Helper()
	const header = 7 // wlog's fragment header: type, length, CRC
	out := make([]span, len(recs))
	for i, r := range recs {
		s := bytes.Index(file, r[:8])
		e := bytes.Index(file, r[len(r)-8:])
		if s < header || e < s {
			t.Fatalf("record %d not found in the segment by its markers: change the test's record sizes", i)
		}
		out[i] = span{hdr: s - header, end: e + 8}
	}
	return out
}

// TestLogTornTail damages the log the way a crash or a bad disk would and
// checks that Replay returns a prefix of the records (never a changed
// one, never an extra one), says whether it cut something, and leaves a
// log that takes appends and replays them after the next restart.
func TestLogTornTail(t *testing.T) {
	// The records fill a few pages: the 20 KB ones are split across page
	// boundaries, where a torn write leaves a first fragment with nothing
	// after it.
	recs := testRecords(0, 24, 200, 5000, 20_000, 64, 1200)
	type damage struct {
		// name says what was done; apply does it to the segment file
		// holding the records (sp says where each lies) and returns how
		// many records must survive, and whether Replay must report a
		// repair.
		name  string
		apply func(t *testing.T, path string, file []byte, sp []span) (keep int, repaired bool)
	}
	chop := func(name string, at func(file []byte, sp []span) int) damage {
		return damage{name: "chop " + name, apply: func(t *testing.T, path string, file []byte, sp []span) (int, bool) {
			c := at(file, sp)
			if err := os.Truncate(path, int64(c)); err != nil {
				t.Fatal(err)
			}
			// Records wholly before the cut survive; a record the cut
			// goes through is torn and must be repaired away.
			keep, torn := 0, false
			for _, s := range sp {
				if s.end <= c {
					keep++
				} else if s.hdr < c {
					torn = true
				}
			}
			t.Logf("chopped at %d of %d: %d records whole, torn %v", c, len(file), keep, torn)
			return keep, torn
		}}
	}
	// pageCut is the page boundary inside the first record split by one.
	pageCut := func(file []byte, sp []span) int {
		for _, s := range sp {
			if b := (s.hdr/pageSize + 1) * pageSize; b < s.end {
				return b
			}
		}
		panic("no record crosses a page boundary")
	}
	last := len(recs) - 1
	damages := []damage{
		chop("nothing but padding", func(file []byte, sp []span) int { return sp[last].end }),
		chop("the last byte of the last record", func(file []byte, sp []span) int { return sp[last].end - 1 }),
		chop("mid last record", func(file []byte, sp []span) int { return (sp[last].hdr + sp[last].end) / 2 }),
		chop("at the last record's header", func(file []byte, sp []span) int { return sp[last].hdr }),
		// A torn header keeping its first byte or two: wlog would read
		// [type, 0...] as a whole empty record.
		chop("after the last header's first byte", func(file []byte, sp []span) int { return sp[last].hdr + 1 }),
		chop("after the last header's second byte", func(file []byte, sp []span) int { return sp[last].hdr + 2 }),
		chop("mid header", func(file []byte, sp []span) int { return sp[last].hdr + 4 }),
		chop("at a page boundary inside a record", pageCut),
		// The same for the header of a record's last fragment: [type, 0...]
		// would read as a last fragment of length 0, ending the record
		// with the first fragment's bytes only.
		chop("a byte after a page boundary inside a record", func(file []byte, sp []span) int { return pageCut(file, sp) + 1 }),
		chop("two bytes after a page boundary inside a record", func(file []byte, sp []span) int { return pageCut(file, sp) + 2 }),
		chop("just after a page boundary inside a record", func(file []byte, sp []span) int { return pageCut(file, sp) + 3 }),
		chop("mid log", func(file []byte, sp []span) int { return sp[10].hdr + 100 }),
		chop("to nothing", func([]byte, []span) int { return 0 }),
		{name: "garbage appended", apply: func(t *testing.T, path string, file []byte, sp []span) (int, bool) {
			writeFile(t, path, append(slices.Clone(file), "not a wal record, just bytes"...))
			return len(recs), true
		}},
		{name: "zeros appended", apply: func(t *testing.T, path string, file []byte, sp []span) (int, bool) {
			writeFile(t, path, append(slices.Clone(file), make([]byte, 5000)...))
			return len(recs), false
		}},
		{name: "byte flipped mid record", apply: func(t *testing.T, path string, file []byte, sp []span) (int, bool) {
			b := slices.Clone(file)
			b[(sp[12].hdr+sp[12].end)/2] ^= 0x20
			writeFile(t, path, b)
			return 12, true
		}},
		{name: "byte flipped in a header", apply: func(t *testing.T, path string, file []byte, sp []span) (int, bool) {
			b := slices.Clone(file)
			b[sp[7].hdr+2] ^= 0x01 // length
			writeFile(t, path, b)
			return 7, true
		}},
		{name: "byte flipped in the second fragment", apply: func(t *testing.T, path string, file []byte, sp []span) (int, bool) {
			b := slices.Clone(file)
			c := pageCut(file, sp)
			b[c+100] ^= 0x01
			writeFile(t, path, b)
			for i, s := range sp {
				if s.hdr < c && c < s.end {
					return i, true
				}
			}
			panic("unreachable")
		}},
	}
	for _, d := range damages {
		t.Run(d.name, func(t *testing.T) {
			dir := t.TempDir()
			writeLog(t, dir, 0, recs)
			path := segmentPath(dir, 0)
			file, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			keep, repaired := d.apply(t, path, file, recordSpans(t, file, recs))
			checkReplayAfterDamage(t, dir, 0, recs[:keep], repaired)
		})
	}
}

// TestLogCorruptMiddleSegment flips a byte in a segment that is neither
// the first nor the last: the records after it, in every later segment,
// are dropped, and the log goes on from there.
func TestLogCorruptMiddleSegment(t *testing.T) {
	dir := t.TempDir()
	parts := [][][]byte{testRecords(0, 6, 300), testRecords(6, 6, 300), testRecords(12, 6, 300)}
	l, _ := openTestLog(t, dir, 0)
	var cuts []*CutPoint
	for i, p := range parts {
		if i > 0 {
			cuts = append(cuts, l.Cut())
		}
		appendWait(t, l, p)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	path := segmentPath(dir, cuts[0].Segment)
	file, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sp := recordSpans(t, file, parts[1])
	file[sp[2].end-10] ^= 0x80
	writeFile(t, path, file)
	checkReplayAfterDamage(t, dir, 0, slices.Concat(parts[0], parts[1][:2]), true)
}

// checkReplayAfterDamage reopens the damaged log in dir, replays it from
// first, and checks the result and that the repaired log works on.
func checkReplayAfterDamage(t *testing.T, dir string, first int, want [][]byte, repaired bool) {
	t.Helper()
	l, _ := openTestLog(t, dir, 0)
	got, st := replayAll(t, l, first)
	equalRecords(t, "replay of the damaged log", got, want)
	if st.Repaired != repaired {
		t.Errorf("repaired = %v (%s), want %v", st.Repaired, st.Lost, repaired)
	}
	// The repaired log takes appends, and the next restart replays what
	// survived and what came after, nothing else.
	more := testRecords(1000, 5, 100, 20_000)
	appendWait(t, l, more)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l2, _ := openTestLog(t, dir, 0)
	got, st = replayAll(t, l2, first)
	equalRecords(t, "replay after repair and appends", got, slices.Concat(want, more))
	if st.Repaired {
		t.Errorf("repaired log needed repair again: %s", st.Lost)
	}
}

func writeFile(t testing.TB, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
