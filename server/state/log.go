package state

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/prometheus/tsdb/wlog"
	"github.com/prometheus/prometheus/util/compression"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
)

// ErrClosed is returned by Wait for records appended after Close.
var ErrClosed = errors.New("state log closed")

// wlog's page and fragment header sizes (unexported there): records are
// split into fragments at page boundaries, each behind a 7-byte header.
const (
	wlogPageSize   = 32 << 10
	wlogHeaderSize = 7
)

// walDir is the log's directory inside the state directory.
const walDir = "wal"

// Log is the write-ahead log with group commit. Append and Cut only queue
// (they run under the caller's ordering lock); the committer goroutine
// writes and fsyncs; Wait blocks until a position is durable.
type Log struct {
	wl  *wlog.WL
	log *slog.Logger

	mu       sync.Mutex
	queue    []item
	spare    []item
	appended uint64 // position of the last queued item
	durable  uint64 // position of the last item written and fsynced
	err      error  // sticky: once writing failed, nothing is durable any more
	closed   bool
	round    chan struct{} // closed when durable (or err) changes
	seg      int           // segment the committer writes to; -1: not known yet
	wake     chan struct{} // capacity 1: work is queued
	done     chan struct{} // closed when the committer has returned

	fsyncs    *metrics.Counter
	records   *metrics.Counter
	bytes     *metrics.Counter
	failures  *metrics.Counter
	roundSize *metrics.Gauge
}

// item is a queued record, or a cut when cut is non-nil.
type item struct {
	rec []byte
	cut *CutPoint
}

// CutPoint is where Cut closed the log: Segment is the first segment
// holding records queued after the cut, valid once Wait(Pos) returned nil.
type CutPoint struct {
	Pos     uint64
	Segment int
}

// LogOptions configure OpenLog.
type LogOptions struct {
	// Dir is the state directory; the log is its wal/ subdirectory.
	Dir string
	// SegmentSize is the size at which the log starts a new segment
	// (a multiple of 32 KiB; 0 means wlog's default, 128 MiB).
	SegmentSize int
	// Registry receives the log's self-metrics; Logger its messages.
	Registry *metrics.Registry
	Logger   *slog.Logger
}

// OpenLog opens the state directory's log for appending. Records already
// in it are read with Replay before the first Append.
func OpenLog(opts LogOptions) (*Log, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Registry == nil {
		opts.Registry = metrics.New()
	}
	size := opts.SegmentSize
	if size == 0 {
		size = wlog.DefaultSegmentSize
	}
	dir := filepath.Join(opts.Dir, walDir)
	wl, err := wlog.NewSize(opts.Logger, nil, dir, size, compression.None)
	if err != nil {
		return nil, fmt.Errorf("opening write-ahead log %s: %w", dir, err)
	}
	reg := opts.Registry
	l := &Log{
		wl:    wl,
		log:   opts.Logger,
		round: make(chan struct{}),
		seg:   -1,
		wake:  make(chan struct{}, 1),
		done:  make(chan struct{}),
		fsyncs: reg.Counter("kubezonnet_server_state_fsyncs_total",
			"fsyncs of the write-ahead log: one per group-commit round, however many batches it holds."),
		records: reg.Counter("kubezonnet_server_state_records_total", "Records written to the write-ahead log."),
		bytes:   reg.Counter("kubezonnet_server_state_record_bytes_total", "Bytes of the records written to the write-ahead log."),
		failures: reg.Counter("kubezonnet_server_state_write_failures_total",
			"Failed write-ahead log writes; after one, batches are refused (503) instead of acknowledged without being durable."),
		roundSize: reg.Gauge("kubezonnet_server_state_commit_round_records",
			"Records written by the last group-commit round."),
	}
	go l.commit()
	return l, nil
}

// Append queues rec (which the log now owns) and returns its position for
// Wait. Callers append under the lock that orders their changes, so the
// log's order is theirs. rec must not be empty: Replay takes an empty
// record for corruption (a flipped padding byte reads back as one).
func (l *Log) Append(rec []byte) uint64 {
	if len(rec) == 0 {
		panic("state: empty write-ahead log record")
	}
	return l.enqueue(item{rec: rec})
}

// Cut queues a segment boundary at this point of the order. A snapshot
// taken under the same ordering lock holds exactly the records queued
// before it; once Wait(c.Pos) returned nil, c.Segment is the first
// segment it does not hold.
func (l *Log) Cut() *CutPoint {
	c := &CutPoint{}
	c.Pos = l.enqueue(item{cut: c})
	return c
}

func (l *Log) enqueue(it item) uint64 {
	l.mu.Lock()
	l.appended++
	pos := l.appended
	if it.cut != nil {
		it.cut.Pos = pos
	}
	l.queue = append(l.queue, it)
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	return pos
}

// Wait blocks until the record at pos is durable, writing failed, or ctx
// ends.
func (l *Log) Wait(ctx context.Context, pos uint64) error {
	for {
		l.mu.Lock()
		durable, err, round := l.durable, l.err, l.round
		l.mu.Unlock()
		if durable >= pos {
			return nil
		}
		if err != nil {
			return err
		}
		select {
		case <-round:
		case <-ctx.Done():
			return fmt.Errorf("waiting for the write-ahead log: %w", ctx.Err())
		}
	}
}

// commit is the committer goroutine: each round takes everything queued,
// writes the records up to each cut with one Log call, starts a new
// segment at each cut, fsyncs once, and wakes the waiters.
func (l *Log) commit() {
	defer close(l.done)
	var recs [][]byte
	for {
		l.mu.Lock()
		for len(l.queue) == 0 && !l.closed {
			l.mu.Unlock()
			<-l.wake
			l.mu.Lock()
		}
		if len(l.queue) == 0 && l.closed {
			l.mu.Unlock()
			return
		}
		batch := l.queue
		l.queue = l.spare[:0]
		last := l.appended
		broken := l.err != nil
		l.mu.Unlock()

		var err error
		if !broken {
			err = l.write(batch, &recs)
		}
		clear(batch) // do not pin written records
		l.mu.Lock()
		l.spare = batch[:0]
		if err != nil && l.err == nil {
			l.err = fmt.Errorf("write-ahead log: %w", err)
			l.failures.Inc()
			l.log.Error("write-ahead log write failed: batches are refused until the server restarts", "err", err)
		}
		if l.err == nil {
			l.durable = last
		}
		close(l.round)
		l.round = make(chan struct{})
		l.mu.Unlock()
	}
}

// write logs batch in order and fsyncs once.
func (l *Log) write(batch []item, recs *[][]byte) error {
	n, size := 0, 0
	if l.seg < 0 {
		seg, _, err := l.wl.LastSegmentAndOffset()
		if err != nil {
			return fmt.Errorf("finding the current segment: %w", err)
		}
		l.seg = seg
	}
	first := l.seg
	flush := func() error {
		if len(*recs) == 0 {
			return nil
		}
		err := l.wl.Log(*recs...)
		clear(*recs)
		*recs = (*recs)[:0]
		return err
	}
	for _, it := range batch {
		if it.cut == nil {
			*recs = append(*recs, it.rec)
			n++
			size += len(it.rec)
			continue
		}
		if err := flush(); err != nil {
			return err
		}
		// NextSegmentSync fsyncs and closes the segment it ends, so
		// everything before the cut is durable once it returns.
		seg, err := l.wl.NextSegmentSync()
		if err != nil {
			return fmt.Errorf("starting a segment at a checkpoint cut: %w", err)
		}
		it.cut.Segment = seg
		l.fsyncs.Inc()
	}
	if err := flush(); err != nil {
		return err
	}
	if n > 0 {
		// wlog starts a new segment when one is full and fsyncs the old
		// one in the background: a round that filled a segment fsyncs it
		// itself before its records count as durable.
		last, _, err := l.wl.LastSegmentAndOffset()
		if err != nil {
			return fmt.Errorf("finding the current segment: %w", err)
		}
		for seg := first; seg < last; seg++ {
			if err := syncSegment(l.wl.Dir(), seg); err != nil {
				return err
			}
		}
		l.seg = last
		if err := l.wl.Sync(); err != nil {
			return fmt.Errorf("fsync: %w", err)
		}
		l.fsyncs.Inc()
	}
	l.records.Add(float64(n))
	l.bytes.Add(float64(size))
	l.roundSize.Set(float64(n))
	return nil
}

// syncSegment fsyncs a closed segment file (a missing one was truncated:
// it is in a checkpoint).
func syncSegment(dir string, seg int) error {
	f, err := os.Open(wlog.SegmentName(dir, seg))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("opening segment %d for fsync: %w", seg, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync of segment %d: %w", seg, err)
	}
	return nil
}

// Truncate removes the segments before seg (they are in a checkpoint).
func (l *Log) Truncate(seg int) error {
	if err := l.wl.Truncate(seg); err != nil {
		return fmt.Errorf("truncating the write-ahead log before segment %d: %w", seg, err)
	}
	return nil
}

// Size returns the bytes the log's segments take on disk.
func (l *Log) Size() (int64, error) { return l.wl.Size() }

// Close writes what is queued, stops the committer and closes the log.
// Records appended afterwards are never durable.
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	<-l.done
	l.mu.Lock()
	if l.err == nil {
		l.err = ErrClosed
	}
	close(l.round)
	l.round = make(chan struct{})
	l.mu.Unlock()
	return l.wl.Close()
}

// ReplayStats says what Replay read.
type ReplayStats struct {
	Records  int
	Bytes    int64
	Segments int
	// Repaired is set when a corrupt or torn tail was cut off; Lost says
	// where (segment and offset), for the log line.
	Repaired bool
	Lost     string
	Duration time.Duration
}

// Replay calls fn with every record of the segments from first on, in
// order. A corrupt or torn record ends the replay there: the log is
// repaired (everything after it removed) and the stats say so. An error
// of fn ends the replay with that error. Call it before the first Append.
//
// Each segment is read on its own, as Prometheus' head does: records never
// span segments, and a reader carried across a segment boundary would
// take a first fragment torn at the end of one segment (a crash between
// two page writes) for the start of a record continued in the next, and
// blame the next segment, so that the repair cut the records written
// after the restart instead of the torn one.
func (l *Log) Replay(first int, fn func(rec []byte) error) (ReplayStats, error) {
	start := time.Now()
	var st ReplayStats
	dir := l.wl.Dir()
	oldest, last, err := wlog.Segments(dir)
	if err != nil {
		return st, fmt.Errorf("listing write-ahead log segments: %w", err)
	}
	first = max(first, oldest) // segments before the oldest were truncated
	for seg := first; seg <= last; seg++ {
		s, err := wlog.OpenReadSegment(wlog.SegmentName(dir, seg))
		if err != nil {
			return st, fmt.Errorf("opening write-ahead log segment %d: %w", seg, err)
		}
		fi, err := s.Stat()
		if err != nil {
			s.Close()
			return st, fmt.Errorf("opening write-ahead log segment %d: %w", seg, err)
		}
		st.Segments++
		r := wlog.NewReader(wlog.NewSegmentBufReader(s))
		var corrupt error
		for r.Next() {
			rec := r.Record()
			// wlog's reader pads a short segment with zeros to its page
			// end, so a fragment header torn after its first byte or two
			// reads back as [type, 0...]: a fragment of length 0 whose
			// CRC (0) matches. As a last fragment, it ends a record with
			// its first fragment's bytes only; as a full one, it is an
			// empty record. Such a record ends past the segment's real
			// end. An empty record within it is a flipped padding byte:
			// Append takes no empty record. The same torn header followed
			// by zeros in the file itself (a crash can leave a file's tail
			// zero-filled) ends the record with an empty last fragment,
			// right after a page's first header: wlog writes no empty
			// fragment but a first one, so no whole record ends there.
			var torn string
			switch {
			case r.Offset() > fi.Size():
				torn = "record completed by the padding past the segment's end (a torn header)"
			case len(rec) == 0:
				torn = "empty record"
			case r.Offset()%wlogPageSize == wlogHeaderSize:
				torn = "record ended by an empty fragment (a torn header followed by zeros)"
			}
			if torn != "" {
				corrupt = &wlog.CorruptionErr{Dir: dir, Segment: seg, Offset: r.Offset(), Err: errors.New(torn)}
				break
			}
			st.Records++
			st.Bytes += int64(len(rec))
			if err := fn(rec); err != nil {
				s.Close()
				return st, fmt.Errorf("replaying write-ahead log record %d (segment %d, offset %d): %w",
					st.Records, seg, r.Offset(), err)
			}
		}
		if corrupt == nil {
			corrupt = r.Err()
		}
		s.Close()
		if corrupt == nil {
			continue
		}
		var cerr *wlog.CorruptionErr
		if !errors.As(corrupt, &cerr) {
			return st, fmt.Errorf("reading write-ahead log: %w", corrupt)
		}
		st.Repaired = true
		st.Lost = fmt.Sprintf("segment %d offset %d: %v", cerr.Segment, cerr.Offset, cerr.Err)
		// Repair keeps the segment's records before the offset and
		// removes every later segment.
		if err := l.wl.Repair(corrupt); err != nil {
			return st, fmt.Errorf("repairing write-ahead log at %s: %w", st.Lost, err)
		}
		break
	}
	st.Duration = time.Since(start)
	return st, nil
}
