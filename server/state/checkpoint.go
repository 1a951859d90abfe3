package state

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// checkpointPrefix names checkpoint files: checkpoint.NNNNNNNN, the number
// being the first log segment the checkpoint does not hold.
const checkpointPrefix = "checkpoint."

// checkpointMagic starts every checkpoint file; its last byte is the
// format version.
var checkpointMagic = []byte("KZNCKPT\x01")

// keepCheckpoints is how many checkpoints (and the log segments from the
// oldest on) are kept: the newest, and one to fall back on should the
// newest not read back whole.
const keepCheckpoints = 2

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// WriteCheckpoint writes the checkpoint for log segment seg (the first it
// does not hold) with the body write produces, atomically: a temporary
// file, fsynced, renamed, and the directory fsynced. It returns the file's
// size.
func WriteCheckpoint(dir string, seg int, write func(w io.Writer) error) (int64, error) {
	name := filepath.Join(dir, fmt.Sprintf("%s%08d", checkpointPrefix, seg))
	tmp := name + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, fmt.Errorf("creating checkpoint: %w", err)
	}
	defer func() {
		if f != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	if _, err := bw.Write(checkpointMagic); err != nil {
		return 0, fmt.Errorf("writing checkpoint %s: %w", tmp, err)
	}
	cw := &crcWriter{w: bw}
	if err := write(cw); err != nil {
		return 0, fmt.Errorf("writing checkpoint %s: %w", tmp, err)
	}
	var trailer [12]byte
	binary.LittleEndian.PutUint64(trailer[:8], uint64(cw.n))
	binary.LittleEndian.PutUint32(trailer[8:], cw.crc)
	if _, err := bw.Write(trailer[:]); err != nil {
		return 0, fmt.Errorf("writing checkpoint %s: %w", tmp, err)
	}
	if err := bw.Flush(); err != nil {
		return 0, fmt.Errorf("writing checkpoint %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		return 0, fmt.Errorf("fsync of checkpoint %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return 0, fmt.Errorf("closing checkpoint %s: %w", tmp, err)
	}
	f = nil
	if err := os.Rename(tmp, name); err != nil {
		return 0, fmt.Errorf("renaming checkpoint: %w", err)
	}
	if err := syncDir(dir); err != nil {
		return 0, err
	}
	return int64(len(checkpointMagic)) + cw.n + int64(len(trailer)), nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("opening state directory for fsync: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync of state directory %s: %w", dir, err)
	}
	return nil
}

// crcWriter counts and checksums what passes through it.
type crcWriter struct {
	w   io.Writer
	crc uint32
	n   int64
}

func (c *crcWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.crc = crc32.Update(c.crc, castagnoli, p[:n])
	c.n += int64(n)
	return n, err
}

// checkpointFile is a checkpoint found in the state directory.
type checkpointFile struct {
	name string
	seg  int
}

// listCheckpoints returns the state directory's checkpoints, oldest first.
func listCheckpoints(dir string) ([]checkpointFile, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading state directory: %w", err)
	}
	var out []checkpointFile
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), checkpointPrefix)
		if !ok || e.IsDir() {
			continue
		}
		seg, err := strconv.Atoi(rest)
		if err != nil || seg < 0 {
			continue // a .tmp left by a crash, or a stranger
		}
		out = append(out, checkpointFile{name: e.Name(), seg: seg})
	}
	slices.SortFunc(out, func(a, b checkpointFile) int { return a.seg - b.seg })
	return out, nil
}

// ErrCorruptCheckpoint is wrapped by errors about checkpoints that do not
// read back whole.
var ErrCorruptCheckpoint = errors.New("corrupt checkpoint")

// ReadCheckpointFile reads and verifies one checkpoint file, returning
// its body.
func ReadCheckpointFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint: %w", err)
	}
	return VerifyCheckpoint(b)
}

// VerifyCheckpoint checks a checkpoint file's framing (magic, length,
// CRC32-C) and returns its body.
func VerifyCheckpoint(b []byte) ([]byte, error) {
	if len(b) < len(checkpointMagic)+12 || string(b[:len(checkpointMagic)]) != string(checkpointMagic) {
		return nil, fmt.Errorf("%w: no kubezonnet checkpoint header", ErrCorruptCheckpoint)
	}
	body := b[len(checkpointMagic) : len(b)-12]
	trailer := b[len(b)-12:]
	if n := binary.LittleEndian.Uint64(trailer[:8]); n != uint64(len(body)) {
		return nil, fmt.Errorf("%w: body of %d bytes, trailer says %d (truncated?)", ErrCorruptCheckpoint, len(body), n)
	}
	if crc := binary.LittleEndian.Uint32(trailer[8:]); crc != crc32.Checksum(body, castagnoli) {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrCorruptCheckpoint)
	}
	return body, nil
}

// Checkpoint is a checkpoint loaded by LoadCheckpoint.
type Checkpoint struct {
	// Segment is the first log segment to replay after loading Body.
	Segment int
	Body    []byte
	// Name is the file it came from; Skipped lists newer ones that did not
	// read back whole (each with its error).
	Name    string
	Skipped []string
}

// LoadCheckpoint returns the newest checkpoint of dir that reads back whole
// and that load accepts, or a zero Checkpoint (replay from segment 0) when
// there is none. Checkpoints skipped are listed in the result, not fatal.
func LoadCheckpoint(dir string, log *slog.Logger, load func(body []byte) error) (Checkpoint, error) {
	cps, err := listCheckpoints(dir)
	if err != nil {
		return Checkpoint{}, err
	}
	var skipped []string
	for i := len(cps) - 1; i >= 0; i-- {
		c := cps[i]
		body, err := ReadCheckpointFile(filepath.Join(dir, c.name))
		if err == nil {
			err = load(body)
		}
		if err != nil {
			log.Error("checkpoint unusable, trying an older one", "file", c.name, "err", err)
			skipped = append(skipped, fmt.Sprintf("%s: %v", c.name, err))
			continue
		}
		return Checkpoint{Segment: c.seg, Body: body, Name: c.name, Skipped: skipped}, nil
	}
	return Checkpoint{Skipped: skipped}, nil
}

// RemoveOldCheckpoints keeps the newest keepCheckpoints checkpoints and
// returns the segment of the oldest kept: log segments before it are in
// no checkpoint that may still be needed and can be truncated.
func RemoveOldCheckpoints(dir string) (int, error) {
	cps, err := listCheckpoints(dir)
	if err != nil {
		return 0, err
	}
	if len(cps) == 0 {
		return 0, nil
	}
	cut := max(0, len(cps)-keepCheckpoints)
	for _, c := range cps[:cut] {
		if err := os.Remove(filepath.Join(dir, c.name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return 0, fmt.Errorf("removing old checkpoint: %w", err)
		}
	}
	return cps[cut].seg, nil
}
