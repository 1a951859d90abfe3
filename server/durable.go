package server

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/server/aggregate"
	"github.com/kubezonnet/kubezonnet/server/state"
)

// durable makes the server's counters and de-duplication table survive a
// crash (--state-dir): it is the aggregator's journal, loads the state at
// start and writes checkpoints. See server/state for the guarantees.
type durable struct {
	dir string
	agg *aggregate.Aggregator
	dd  *dedup
	log *slog.Logger
	now func() time.Time

	wal *state.Log
	cpm sync.Mutex // one checkpoint at a time

	checkpoints, checkpointFailures, repairs *metrics.Counter
	checkpointSeconds, checkpointBytes       *metrics.Gauge
	checkpointSeries, replaySeconds          *metrics.Gauge
	walBytes                                 *metrics.Gauge
}

func newDurable(dir string, dd *dedup, reg *metrics.Registry, log *slog.Logger, now func() time.Time) *durable {
	return &durable{
		dir: dir, dd: dd, log: log.With("state_dir", dir), now: now,
		checkpoints: reg.Counter("kubezonnet_server_state_checkpoints_total", "Checkpoints written."),
		checkpointFailures: reg.Counter("kubezonnet_server_state_checkpoint_failures_total",
			"Checkpoints that failed (the log keeps growing until one succeeds)."),
		repairs: reg.Counter("kubezonnet_server_state_repairs_total",
			"Corrupt or torn state found at start: a log tail cut off, a record refused or a checkpoint skipped."),
		checkpointSeconds: reg.Gauge("kubezonnet_server_state_checkpoint_duration_seconds", "Duration of the last checkpoint."),
		checkpointBytes:   reg.Gauge("kubezonnet_server_state_checkpoint_bytes", "Size of the last checkpoint file."),
		checkpointSeries:  reg.Gauge("kubezonnet_server_state_checkpoint_series", "Series in the last checkpoint."),
		replaySeconds:     reg.Gauge("kubezonnet_server_state_replay_duration_seconds", "Duration of loading the checkpoint and replaying the log at start."),
		walBytes:          reg.Gauge("kubezonnet_server_state_wal_bytes", "Size of the write-ahead log after the last checkpoint."),
	}
}

// Append implements aggregate.Journal.
func (d *durable) Append(rec []byte, id *aggregate.BatchID) uint64 {
	pos := d.wal.Append(rec)
	if id != nil {
		d.dd.logged(id)
	}
	return pos
}

// Wait blocks until the journal position pos is durable.
func (d *durable) Wait(ctx context.Context, pos uint64) error {
	if pos == 0 {
		return nil
	}
	return d.wal.Wait(ctx, pos)
}

// open loads the newest usable checkpoint into the aggregator and the
// de-duplication table, replays the log after it, and opens the log for
// appending. Corruption is repaired, logged and counted, never fatal.
func (d *durable) open(agg *aggregate.Aggregator, reg *metrics.Registry) error {
	d.agg = agg
	start := time.Now()
	if err := os.MkdirAll(d.dir, 0o700); err != nil {
		return fmt.Errorf("--state-dir %q: %w", d.dir, err)
	}
	var applied []appliedBatch
	cp, err := state.LoadCheckpoint(d.dir, d.log, func(body []byte) error {
		a, rest, err := decodeApplied(body)
		if err != nil {
			return err
		}
		if err := agg.Restore(rest); err != nil {
			return err
		}
		applied = a
		return nil
	})
	if err != nil {
		return fmt.Errorf("--state-dir %q: %w", d.dir, err)
	}
	d.repairs.Add(float64(len(cp.Skipped)))
	wal, err := state.OpenLog(state.LogOptions{Dir: d.dir, Registry: reg, Logger: d.log})
	if err != nil {
		return fmt.Errorf("--state-dir %q: %w", d.dir, err)
	}
	d.wal = wal
	now := d.now()
	refused := 0
	st, err := wal.Replay(cp.Segment, func(rec []byte) error {
		id, err := agg.Replay(rec)
		if err != nil {
			// A whole (checksummed) record that does not apply: a bug
			// or a foreign file. Skip it, say so, keep the rest.
			refused++
			if refused <= 10 {
				d.log.Error("state record refused at replay", "err", err)
			}
			return nil
		}
		if id != nil {
			applied = append(applied, appliedBatch{id.Node, id.Incarnation, id.Seq, now})
		}
		return nil
	})
	if err != nil {
		wal.Close()
		return fmt.Errorf("--state-dir %q: %w", d.dir, err)
	}
	agg.FinishReplay()
	for _, b := range applied {
		d.dd.restore(b, now)
	}
	if st.Repaired {
		d.repairs.Inc()
		d.log.Error("write-ahead log had a corrupt or torn tail: cut off there (batches after it were never acknowledged, or are lost)",
			"at", st.Lost)
	}
	d.repairs.Add(float64(refused))
	d.replaySeconds.Set(time.Since(start).Seconds())
	d.log.Info("state loaded", "checkpoint", cp.Name, "checkpoints_skipped", len(cp.Skipped),
		"series", agg.Len(), "replayed_records", st.Records, "replayed_bytes", st.Bytes,
		"replayed_segments", st.Segments, "refused_records", refused, "duration", time.Since(start).String())
	return nil
}

// checkpoint writes the aggregator and the applied batches to a new
// checkpoint and truncates the log before it.
func (d *durable) checkpoint(ctx context.Context) error {
	d.cpm.Lock()
	defer d.cpm.Unlock()
	start := time.Now()
	var cut *state.CutPoint
	var applied []appliedBatch
	snap := d.agg.Snapshot(func() {
		cut = d.wal.Cut()
		applied = d.dd.loggedBatches()
	})
	err := d.writeCheckpoint(ctx, cut, applied, snap)
	if err != nil {
		d.checkpointFailures.Inc()
		return err
	}
	d.checkpoints.Inc()
	d.checkpointSeconds.Set(time.Since(start).Seconds())
	d.checkpointSeries.Set(float64(snap.Len()))
	return nil
}

func (d *durable) writeCheckpoint(ctx context.Context, cut *state.CutPoint, applied []appliedBatch, snap *aggregate.Snapshot) error {
	// The cut must be on disk before a checkpoint names it: its segment
	// number is only known once the committer has passed it.
	if err := d.wal.Wait(ctx, cut.Pos); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	size, err := state.WriteCheckpoint(d.dir, cut.Segment, func(w io.Writer) error {
		if _, err := w.Write(encodeApplied(applied)); err != nil {
			return err
		}
		_, err := snap.WriteTo(w)
		return err
	})
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	d.checkpointBytes.Set(float64(size))
	keep, err := state.RemoveOldCheckpoints(d.dir)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	if err := d.wal.Truncate(keep); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	if n, err := d.wal.Size(); err == nil {
		d.walBytes.Set(float64(n))
	}
	return nil
}

// run checkpoints every interval until ctx ends.
func (d *durable) run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			start := time.Now()
			if err := d.checkpoint(ctx); err != nil {
				if ctx.Err() == nil {
					d.log.Error("checkpoint failed", "err", err)
				}
				continue
			}
			d.log.Debug("checkpoint written", "duration", time.Since(start).String())
		}
	}
}

// close writes what is queued and closes the log.
func (d *durable) close() error {
	if d.wal == nil {
		return nil
	}
	return d.wal.Close()
}

// The applied-batches section of a checkpoint body: a count, then per
// incarnation its node, id, last applied seq and last seen (unix ns).
func encodeApplied(bs []appliedBatch) []byte {
	var b []byte
	b = binary.AppendUvarint(b, uint64(len(bs)))
	for _, a := range bs {
		b = binary.AppendUvarint(b, uint64(len(a.node)))
		b = append(b, a.node...)
		b = binary.AppendUvarint(b, uint64(len(a.incarnation)))
		b = append(b, a.incarnation...)
		b = binary.AppendUvarint(b, a.seq)
		b = binary.AppendVarint(b, a.seen.UnixNano())
	}
	return b
}

var errApplied = errors.New("corrupt applied-batches section")

// decodeApplied reads the applied-batches section and returns the rest of
// the body.
func decodeApplied(body []byte) ([]appliedBatch, []byte, error) {
	r := bytes.NewReader(body)
	n, err := binary.ReadUvarint(r)
	if err != nil || n > uint64(len(body)) {
		return nil, nil, errApplied
	}
	str := func() (string, error) {
		l, err := binary.ReadUvarint(r)
		if err != nil || l > uint64(r.Len()) {
			return "", errApplied
		}
		b := make([]byte, l)
		_, _ = r.Read(b)
		return string(b), nil
	}
	out := make([]appliedBatch, 0, n)
	for range n {
		node, err1 := str()
		inc, err2 := str()
		seq, err3 := binary.ReadUvarint(r)
		seen, err4 := binary.ReadVarint(r)
		if err := errors.Join(err1, err2, err3, err4); err != nil {
			return nil, nil, errApplied
		}
		out = append(out, appliedBatch{node, inc, seq, time.Unix(0, seen)})
	}
	return out, body[len(body)-r.Len():], nil
}
