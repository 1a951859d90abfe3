package state

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

var discard = slog.New(slog.DiscardHandler)

// checkpointBody is a deterministic body of n bytes.
func checkpointBody(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// writeBody writes body as the checkpoint of segment seg, in pieces of
// uneven size (as a body's writer does).
func writeBody(t testing.TB, dir string, seg int, body []byte) int64 {
	t.Helper()
	size, err := WriteCheckpoint(dir, seg, func(w io.Writer) error {
		for rest := body; len(rest) > 0; {
			n := min(len(rest), 1+len(rest)/3)
			if _, err := w.Write(rest[:n]); err != nil {
				return err
			}
			rest = rest[n:]
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return size
}

func checkpointName(seg int) string { return fmt.Sprintf("checkpoint.%08d", seg) }

func TestCheckpointRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		body []byte
	}{
		{"empty body", nil},
		{"one byte", []byte{0}},
		{"small", checkpointBody(1, 300)},
		// Larger than WriteCheckpoint's buffer.
		{"large", checkpointBody(2, 3<<20+17)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			size := writeBody(t, dir, 42, tc.body)
			path := filepath.Join(dir, checkpointName(42))
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size() != size {
				t.Errorf("WriteCheckpoint says %d bytes, the file has %d", size, fi.Size())
			}
			got, err := ReadCheckpointFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tc.body) {
				t.Fatalf("body read back differs (%d bytes, want %d)", len(got), len(tc.body))
			}
			// Nothing but the checkpoint is left behind.
			ents, _ := os.ReadDir(dir)
			if len(ents) != 1 {
				t.Errorf("state directory holds %d entries, want the checkpoint only", len(ents))
			}
		})
	}
}

// TestCheckpointCorrupt truncates a checkpoint at every length and flips
// every bit of it: each damaged file must be refused with
// ErrCorruptCheckpoint, never read back as a body.
func TestCheckpointCorrupt(t *testing.T) {
	dir := t.TempDir()
	body := checkpointBody(3, 200)
	writeBody(t, dir, 1, body)
	file, err := os.ReadFile(filepath.Join(dir, checkpointName(1)))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "damaged")
	check := func(what string, b []byte) {
		t.Helper()
		writeFile(t, path, b)
		got, err := ReadCheckpointFile(path)
		if !errors.Is(err, ErrCorruptCheckpoint) {
			t.Fatalf("%s: got %d bytes and error %v, want ErrCorruptCheckpoint", what, len(got), err)
		}
	}
	for n := range len(file) {
		check(fmt.Sprintf("truncated to %d bytes", n), file[:n])
	}
	for i := range file {
		for bit := range 8 {
			b := slices.Clone(file)
			b[i] ^= 1 << bit
			check(fmt.Sprintf("bit %d of byte %d flipped", bit, i), b)
		}
	}
	check("a byte appended", append(slices.Clone(file), 0))
	check("the body doubled", slices.Concat(file[:len(file)-12], body, file[len(file)-12:]))
	if _, err := ReadCheckpointFile(filepath.Join(dir, "missing")); err == nil || errors.Is(err, ErrCorruptCheckpoint) {
		t.Errorf("missing file: %v, want an I/O error", err)
	}
}

func TestCheckpointWriteFailure(t *testing.T) {
	dir := t.TempDir()
	boom := errors.New("boom")
	_, err := WriteCheckpoint(dir, 5, func(w io.Writer) error {
		w.Write([]byte("half a body"))
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("error %v, want the body writer's", err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 0 {
		t.Errorf("a failed checkpoint left %v behind", ents)
	}
}

func TestLoadCheckpoint(t *testing.T) {
	bodies := map[int][]byte{3: []byte("body of 3"), 7: []byte("body of 7"), 12: []byte("body of 12")}
	type setup struct {
		segs    []int
		corrupt []int // truncated after writing
		refuse  []int // load returns an error for these
		extra   []string
	}
	for _, tc := range []struct {
		name        string
		setup       setup
		want        int // segment loaded, -1 for none
		wantSkipped []int
	}{
		{name: "empty directory", want: -1},
		{name: "newest", setup: setup{segs: []int{3, 7, 12}}, want: 12},
		{name: "newest corrupt", setup: setup{segs: []int{3, 7, 12}, corrupt: []int{12}}, want: 7, wantSkipped: []int{12}},
		{name: "two newest corrupt", setup: setup{segs: []int{3, 7, 12}, corrupt: []int{12, 7}}, want: 3, wantSkipped: []int{12, 7}},
		{name: "all corrupt", setup: setup{segs: []int{3, 7}, corrupt: []int{3, 7}}, want: -1, wantSkipped: []int{7, 3}},
		{name: "newest refused by load", setup: setup{segs: []int{3, 7}, refuse: []int{7}}, want: 3, wantSkipped: []int{7}},
		{
			name: "leftovers ignored",
			setup: setup{segs: []int{3}, extra: []string{
				checkpointName(9) + ".tmp", "checkpoint.x", "checkpoint.-4", "unrelated",
			}},
			want: 3,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, s := range tc.setup.segs {
				writeBody(t, dir, s, bodies[s])
			}
			for _, s := range tc.setup.corrupt {
				if err := os.Truncate(filepath.Join(dir, checkpointName(s)), 10); err != nil {
					t.Fatal(err)
				}
			}
			for _, name := range tc.setup.extra {
				writeFile(t, filepath.Join(dir, name), []byte("junk"))
			}
			var loaded [][]byte
			cp, err := LoadCheckpoint(dir, discard, func(body []byte) error {
				for _, s := range tc.setup.refuse {
					if bytes.Equal(body, bodies[s]) {
						return errors.New("refused")
					}
				}
				loaded = append(loaded, slices.Clone(body))
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if tc.want < 0 {
				if cp.Segment != 0 || cp.Body != nil || cp.Name != "" || len(loaded) != 0 {
					t.Errorf("loaded %+v (load called %d times), want nothing", cp, len(loaded))
				}
			} else {
				if cp.Segment != tc.want || cp.Name != checkpointName(tc.want) || !bytes.Equal(cp.Body, bodies[tc.want]) {
					t.Errorf("loaded segment %d (%s, %q), want %d", cp.Segment, cp.Name, cp.Body, tc.want)
				}
				if len(loaded) != 1 || !bytes.Equal(loaded[0], bodies[tc.want]) {
					t.Errorf("load accepted %q, want only the body of %d", loaded, tc.want)
				}
			}
			if len(cp.Skipped) != len(tc.wantSkipped) {
				t.Fatalf("skipped %q, want %v", cp.Skipped, tc.wantSkipped)
			}
			for i, s := range tc.wantSkipped {
				if !strings.HasPrefix(cp.Skipped[i], checkpointName(s)+":") {
					t.Errorf("skipped[%d] = %q, want %s", i, cp.Skipped[i], checkpointName(s))
				}
			}
		})
	}
}

func TestRemoveOldCheckpoints(t *testing.T) {
	for _, tc := range []struct {
		segs     []int
		wantKeep int
		wantLeft []int
	}{
		{segs: nil, wantKeep: 0},
		{segs: []int{4}, wantKeep: 4, wantLeft: []int{4}},
		{segs: []int{4, 9}, wantKeep: 4, wantLeft: []int{4, 9}},
		{segs: []int{12, 1, 9, 4}, wantKeep: 9, wantLeft: []int{9, 12}},
		// Numbers sort as numbers, not as names.
		{segs: []int{99_999_999, 100_000_000, 7}, wantKeep: 99_999_999, wantLeft: []int{99_999_999, 100_000_000}},
	} {
		t.Run(fmt.Sprint(tc.segs), func(t *testing.T) {
			dir := t.TempDir()
			for _, s := range tc.segs {
				writeBody(t, dir, s, []byte{byte(s)})
			}
			writeFile(t, filepath.Join(dir, checkpointName(2)+".tmp"), nil)
			keep, err := RemoveOldCheckpoints(dir)
			if err != nil {
				t.Fatal(err)
			}
			if keep != tc.wantKeep {
				t.Errorf("keep = %d, want %d", keep, tc.wantKeep)
			}
			var left []int
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				var s int
				if _, err := fmt.Sscanf(e.Name(), "checkpoint.%d", &s); err == nil && !strings.HasSuffix(e.Name(), ".tmp") {
					left = append(left, s)
				}
			}
			slices.Sort(left)
			if !slices.Equal(left, tc.wantLeft) {
				t.Errorf("checkpoints left: %v, want %v", left, tc.wantLeft)
			}
		})
	}
}
