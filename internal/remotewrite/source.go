package remotewrite

import "github.com/kubezonnet/kubezonnet/internal/metrics"

// Series is one series of a snapshot with its current cumulative value.
// Labels are sorted by name with __name__ first. A Series is immutable once
// a Source returned it, and so is its label slice, for good: the pusher
// keeps the slice (it needs the labels of a vanished series for its stale
// marker), and it recognises a series by the slice's address, reusing the
// encoding it made of those labels at an earlier push. A Source should
// therefore return the same slice for a series at every push (building a
// new one with the same labels is correct but costs an encoding), and must
// never modify a slice it returned: a changed series needs a new slice.
//
// Created is the series' creation time in milliseconds since the epoch,
// for created-timestamp zero injection: PromQL's increase() and rate()
// cannot see what a counter held at its first sample, so a series whose
// first cumulative value is already non-zero (a pod pair that talked in
// a burst shorter than the push interval) would show ~0 in every
// rate-based panel. When the pusher meets a series it is not sending yet
// and Created is strictly before the snapshot's timestamp, it sends a
// sample of value 0 at Created before the series' first real sample, as
// Prometheus does for scraped counters with created timestamps. 0 means
// "do not inject": the creation time is unknown, or the receiver is
// already known to have the series (see Pusher.OnDelivered). A series
// that vanished and comes back needs a Created after the snapshot that
// carried its stale marker: the receiver holds that marker, and would
// reject an older zero (the pusher then resends the request without it).
//
// MayExist says that a receiver may hold the series already although its
// zero is asked for: a source that restarted and cannot tell whether the
// push that first held the series was delivered. Such a zero may be
// refused, and a receiver refuses the whole request it is in, so each of
// these series travels in a request of its own: a refusal then costs its
// zero only, never the zero of another series.
type Series struct {
	Labels   []metrics.Label
	Value    float64
	Created  int64
	MayExist bool
}

// Source is anything whose series the pusher sends: the server's
// aggregates and its self-metrics. The interface lives here, with its
// consumer, so producers depend on nothing but this package's types.
type Source interface {
	// AppendSeries appends every live series with its current cumulative
	// value to dst and returns the extended slice.
	AppendSeries(dst []Series) []Series
}

// SourceFunc adapts a function to Source.
type SourceFunc func(dst []Series) []Series

// AppendSeries calls f.
func (f SourceFunc) AppendSeries(dst []Series) []Series { return f(dst) }

// RegistrySource turns a self-metrics registry into a Source, so push-only
// clusters get the same kubezonnet_* metrics that /metrics serves.
func RegistrySource(r *metrics.Registry) Source { return registrySource{r} }

type registrySource struct{ r *metrics.Registry }

// AppendSeries copies every registry series: Each's label slice must not
// be kept, and a Series must stay immutable. Self-metrics are a few
// hundred series, so the copies cost nothing worth caching.
func (s registrySource) AppendSeries(dst []Series) []Series {
	s.r.Each(func(name string, labels []metrics.Label, value float64) {
		ls := make([]metrics.Label, 0, 1+len(labels))
		ls = append(ls, metrics.Label{Name: "__name__", Value: name})
		ls = append(ls, labels...)
		dst = append(dst, Series{Labels: ls, Value: value})
	})
	return dst
}
