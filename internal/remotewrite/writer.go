package remotewrite

import (
	"slices"
)

// EncodingSource is a Source that keeps track of its own series between
// snapshots and writes them itself, already encoded: the server's series
// store, which holds millions of series whose labels it interns. The
// pusher keeps no state for such a source's series (no series table
// entry, no label cache), so the source decides what a Series field says
// for the table's: whether a series is new to the receivers (its zero),
// and when one vanished (its stale marker, which the source writes with
// SnapshotWriter.Stale). Its series must not also come from another
// source: they are not checked for duplicates.
//
// EncodeSnapshot writes the source's series for the snapshot stamped ts
// (milliseconds since the epoch) to w, one call per series. The pusher
// calls it once per snapshot, never concurrently with itself, after the
// other sources were read; w is valid only during the call.
type EncodingSource interface {
	Source
	EncodeSnapshot(ts int64, w *SnapshotWriter)
}

// LabelField is one label of a series for SnapshotWriter: its name and
// the label encoded as a TimeSeries.labels field (AppendLabelField), which
// a source that interns labels encodes once per distinct label rather than
// once per series and push.
type LabelField struct {
	Name  string
	Field []byte
}

// AppendLabelField appends the label name=value encoded as a
// TimeSeries.labels field, as LabelField.Field holds it.
func AppendLabelField(dst []byte, name, value string) []byte {
	sb := SeriesBuilder{body: dst}
	sb.Label(name, value)
	return sb.body
}

// SnapshotWriter is how an EncodingSource adds its series to a snapshot:
// it merges the pusher's external and HA labels in, shards the series by
// the hash it is given, and builds the requests.
type SnapshotWriter struct {
	p    *Pusher
	ts   int64
	live int
	lab  []byte
}

// Series adds a series with value v. labels are sorted by name with
// __name__ first, empty values left out; hash is any hash of them that is
// stable for the pusher's life (it picks the shard, which keeps each
// series' samples in order). created, when non-zero and before the
// snapshot's stamp, asks for the zero sample at created first (see
// Series.Created; the source passes it only for a series it has not
// written to this pusher before), and mayExist sends that zero apart (see
// Series.MayExist).
func (w *SnapshotWriter) Series(hash uint64, labels []LabelField, v float64, created int64, mayExist bool) {
	w.live++
	w.lab = w.p.mergeFields(w.lab[:0], labels)
	if created != 0 && created < w.ts {
		w.p.seriesWithZero(hash, w.lab, v, created, mayExist)
		return
	}
	w.p.put(hash, w.lab, v)
}

// Stale adds the stale marker of a series the source wrote to an earlier
// snapshot and holds no more: it ends the series at the receivers now
// rather than after their lookback window.
func (w *SnapshotWriter) Stale(hash uint64, labels []LabelField) {
	w.p.staleMarkers.Inc()
	w.lab = w.p.mergeFields(w.lab[:0], labels)
	w.p.put(hash, w.lab, StaleNaN)
}

// mergeFields appends the encoded label fields of ls merged with the
// external and HA labels, as appendLabels does for a label slice.
func (p *Pusher) mergeFields(dst []byte, ls []LabelField) []byte {
	if len(ls) > 0 && ls[0].Name == "__name__" {
		dst = append(dst, ls[0].Field...)
		ls = ls[1:]
	}
	ex := p.extraFields
	for len(ls) > 0 || len(ex) > 0 {
		switch {
		case len(ex) == 0 || (len(ls) > 0 && ls[0].Name < ex[0].Name):
			dst = append(dst, ls[0].Field...)
			ls = ls[1:]
		case len(ls) == 0 || ex[0].Name < ls[0].Name:
			dst = append(dst, ex[0].Field...)
			ex = ex[1:]
		default: // same name
			if p.extra[len(p.extra)-len(ex)].override {
				dst = append(dst, ex[0].Field...)
			} else {
				dst = append(dst, ls[0].Field...)
			}
			ls, ex = ls[1:], ex[1:]
		}
	}
	return dst
}

// encodeExtra returns the external and HA labels as label fields, in
// the order of extra. An empty value is encoded as nothing: in Prometheus
// an empty label is an absent one (and one overriding a series label
// removes it).
func encodeExtra(extra []extraLabel) []LabelField {
	out := make([]LabelField, 0, len(extra))
	for _, l := range extra {
		var f []byte
		if l.Value != "" {
			f = AppendLabelField(nil, l.Name, l.Value)
		}
		out = append(out, LabelField{Name: l.Name, Field: slices.Clip(f)})
	}
	return out
}
