package remotewrite

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
)

// Pusher sends every live series of its sources to every configured
// endpoint, once per interval.
//
// Delivery model. All series are cumulative counters, so the newest
// snapshot always carries everything an older one did. Each endpoint has a
// fixed number of shards; a series always goes to the same shard (by a
// hash of its labels), and a shard sends its requests one after another,
// so samples of a series reach the receiver in timestamp order. A shard
// holds at most one pending snapshot part: when the next interval's
// snapshot arrives while the shard is still sending or retrying the
// previous one, the newer part replaces the pending one, and a request
// waiting to be retried is abandoned in favour of the newer part (counted
// as failed). Memory is therefore bounded by two snapshots per endpoint
// whatever the outage length, and when an endpoint comes back the first
// thing it receives is the newest cumulative value, so increase() over the
// gap is right. The retry schedule (backoff, Retry-After) belongs to the
// shard, not to a request, so replacing the data never makes a failing
// endpoint be tried sooner.
//
// Overruns. When the interval comes while every endpoint is still sending
// the previous snapshot without errors (a receiver slower than the
// interval, not a failing one), Run does not take a snapshot to queue
// beside it: it counts the overrun and takes the snapshot the moment an
// endpoint has sent everything, so that the newest values go out as soon
// as they can and the encoded requests of one snapshot, not two, are held.
// An endpoint that is retrying gets snapshots at every interval as above,
// the newer replacing the unsent part.
//
// Endpoints are independent: each has its own shards and goroutines, and
// Push only hands the encoded requests over, so a dead or slow endpoint
// never blocks another one or the caller.
//
// Staleness. A series present in one snapshot and absent from the next is
// sent once with the StaleNaN value, then forgotten. If that snapshot is
// replaced before reaching an endpoint (an outage), its stale markers are
// lost for that endpoint and the receiver ends the series by its lookback
// window (5 minutes in Prometheus) instead.
//
// Created-timestamp zeros. increase() and rate() only see a counter grow
// between two of its samples, so a series whose first sample already
// holds a burst would hide that burst. A series the pusher is not sending
// yet (new, or back after its stale marker) whose Series.Created is before
// the snapshot's stamp is therefore sent with two samples: 0 at Created,
// then its value; a series already being sent never is. A receiver that
// already has the series (the server restarted and reports a Created it
// should not have) takes the zero for an out-of-order sample, and
// Prometheus 2.x then rejects the whole request with a 400. So every
// request carrying zeros is also encoded without them, as its fallback,
// and a shard whose request gets a final 4xx other than 429 sends the
// fallback instead, under the same retry rules, counting the zeros in
// kubezonnet_server_remote_write_zero_samples_rejected_total. Only when
// the fallback is rejected too are its samples dropped.
//
// Delivery watermark. OnDelivered reports the stamp of the newest snapshot
// that every endpoint accepted in full (every request answered 2xx,
// possibly through its fallback), or that one superseding it did: from
// then on every receiver has every series of that snapshot, which is what
// the server persists to know, after a restart, which series need no
// zero. A snapshot with a dropped request, or abandoned by some shard for
// a newer one, does not advance it.
type Pusher struct {
	cfg     PusherConfig
	sources []Source
	log     *slog.Logger
	extra   []extraLabel
	// extraFields is extra encoded, for EncodingSource series.
	extraFields []LabelField
	eps         []*endpoint

	// Snapshot state, guarded by pushMu: the series table (snapshot.go)
	// and the encoding buffers reused from push to push.
	pushMu         sync.Mutex
	table          seriesTable
	cur            []Series
	sb, cmp        SeriesBuilder
	sample         []byte
	zsample        []byte // the zero sample being inserted
	maybe          []deferredZero
	maybeLab       []byte // encoded labels of the deferred zeros' series
	raw            [][]byte
	rawN           []int
	zeros          [][]zeroSpan // zero samples in raw, per shard
	plain          []byte       // a request without its zeros
	reqs           [][]request
	zbuf           []byte
	lastTS         int64
	snapshotSeries *metrics.Gauge
	snapshotTime   *metrics.Gauge
	staleMarkers   *metrics.Counter
	duplicates     *metrics.Counter
	// now stamps snapshots: time.Now, or the test's clock.
	now func() time.Time

	// onDelivered is OnDelivered's callback; wmMu serialises its calls
	// and guards wmLast, the last stamp reported.
	onDelivered func(ts int64)
	wmMu        sync.Mutex
	wmLast      int64

	startOnce sync.Once
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	stopped   atomic.Bool

	mu     sync.Mutex
	active int
	idle   chan struct{}
	// freed gets a token when a shard has sent everything it was handed,
	// for Run's deferred snapshot.
	freed chan struct{}
}

// extraLabel is an external or HA label; override says whether it wins
// over a series label of the same name (HA labels must be identical on
// every series for Mimir's HA tracker; external labels yield, as in
// Prometheus).
type extraLabel struct {
	metrics.Label
	override bool
}

// request is one compressed WriteRequest, shared read-only by every
// endpoint.
type request struct {
	body []byte
	// fallback is body without its created-timestamp zeros, nil when it
	// has none.
	fallback []byte
	// samples counts the real samples, one per series (what
	// kubezonnet_server_remote_write_samples_total counts); zeros counts
	// the injected zero samples on top of them.
	samples, zeros int
}

// NewPusher validates cfg and builds a pusher for sources. Self-metrics go
// to reg (a private registry if nil); log may be nil. Nothing runs until
// Run, Push or Flush is called.
func NewPusher(cfg PusherConfig, sources []Source, reg *metrics.Registry, log *slog.Logger) (*Pusher, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if reg == nil {
		reg = metrics.New()
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "remotewrite")
	p := &Pusher{
		cfg:     cfg,
		sources: slices.Clone(sources),
		log:     log,
		table:   newSeriesTable(labelCacheBytes),
		raw:     make([][]byte, cfg.Shards),
		rawN:    make([]int, cfg.Shards),
		zeros:   make([][]zeroSpan, cfg.Shards),
		reqs:    make([][]request, cfg.Shards),
		now:     time.Now,
		idle:    make(chan struct{}),
		freed:   make(chan struct{}, 1),
		snapshotSeries: reg.Gauge("kubezonnet_server_remote_write_snapshot_series",
			"Series in the last snapshot pushed, stale markers excluded."),
		snapshotTime: reg.Gauge("kubezonnet_server_remote_write_snapshot_duration_seconds",
			"Seconds the last snapshot took to read from the sources and encode: the server's part of a push (kubezonnet_server_remote_write_push_duration_seconds adds the sending)."),
		staleMarkers: reg.Counter("kubezonnet_server_remote_write_stale_markers_total",
			"Stale markers generated for series that disappeared between two snapshots."),
		duplicates: reg.Counter("kubezonnet_server_remote_write_duplicate_series_total",
			"Series left out of a snapshot because another source already returned the same labels."),
	}
	p.extra = mergeExtra(cfg.ExternalLabels, cfg.HA.labels())
	p.extraFields = encodeExtra(p.extra)
	for _, ec := range cfg.Endpoints {
		c, err := NewClient(ec, ClientOptions{RetryOn429: cfg.RetryOn429, Component: "server"})
		if err != nil {
			return nil, err
		}
		p.eps = append(p.eps, newEndpoint(p, ec.Name, c, reg))
	}
	return p, nil
}

// mergeExtra sorts external and HA labels into one list; an HA label
// replaces an external label of the same name.
func mergeExtra(ext, ha []metrics.Label) []extraLabel {
	var out []extraLabel
	for _, l := range ext {
		if !slices.ContainsFunc(ha, func(h metrics.Label) bool { return h.Name == l.Name }) {
			out = append(out, extraLabel{Label: l})
		}
	}
	for _, l := range ha {
		out = append(out, extraLabel{Label: l, override: true})
	}
	slices.SortFunc(out, func(a, b extraLabel) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// OnDelivered makes the pusher call f with a snapshot's stamp (milliseconds
// since the epoch, as in the samples) once that snapshot, or a newer one
// that superseded it, has been delivered to every endpoint: every request
// answered 2xx, directly or through its fallback, none dropped. The server
// persists the stamp to know which series every receiver has. Stamps only
// grow: a snapshot completing after a newer one is not reported. Calls
// come from the shard goroutines, never two at a time, and precede the
// return of the Wait (or Flush) that waits for that snapshot; f must not
// block for long (it holds up the shard that completed the snapshot) nor
// call the pusher. With no endpoint every snapshot counts as delivered.
//
// OnDelivered must be called before the first Run, Push or Flush; it is
// not synchronised with them.
func (p *Pusher) OnDelivered(f func(ts int64)) { p.onDelivered = f }

// start launches the shard goroutines once.
func (p *Pusher) start() {
	p.startOnce.Do(func() {
		p.ctx, p.cancel = context.WithCancel(context.Background())
		for _, ep := range p.eps {
			for _, s := range ep.shards {
				p.wg.Add(1)
				go func() {
					defer p.wg.Done()
					s.run(p.ctx)
				}()
			}
		}
	})
}

// Run pushes a snapshot every interval until ctx ends, then returns nil.
// It does not push on return: call Flush with a shutdown deadline for
// that, after Run returned.
//
// A tick that finds every endpoint still sending the previous snapshot
// (see Overruns above) is counted as an overrun and deferred until one of
// them has sent it all.
func (p *Pusher) Run(ctx context.Context) error {
	p.start()
	t := time.NewTicker(p.cfg.Interval)
	defer t.Stop()
	owed := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if p.behind() {
				owed = true
				for _, ep := range p.eps {
					ep.overran()
				}
				continue
			}
		case <-p.freed:
			if !owed || p.behind() {
				continue
			}
		}
		owed = false
		p.Push()
	}
}

// behind reports whether every endpoint is still sending an older
// snapshot and none is retrying: a snapshot taken now would only wait.
func (p *Pusher) behind() bool {
	if len(p.eps) == 0 {
		return false
	}
	for _, ep := range p.eps {
		if ep.failing.Load() || !ep.sending() {
			return false
		}
	}
	return true
}

// sending reports whether a shard of the endpoint has a batch to send.
func (ep *endpoint) sending() bool {
	for _, s := range ep.shards {
		s.mu.Lock()
		busy := s.busy
		s.mu.Unlock()
		if busy {
			return true
		}
	}
	return false
}

// Push takes one snapshot of all sources now and hands it to every
// endpoint. It returns once the requests are encoded; sending happens in
// the background.
func (p *Pusher) Push() {
	if p.stopped.Load() {
		return
	}
	p.start()
	p.pushMu.Lock()
	defer p.pushMu.Unlock()
	if p.stopped.Load() { // Flush finished while we waited for the lock
		return
	}
	start := time.Now()
	// Strictly increasing stamps: two pushes within one millisecond (a
	// Flush right after a tick) must not give a series two different
	// values at one timestamp, which receivers reject.
	ts := max(p.now().UnixMilli(), p.lastTS+1)
	p.lastTS = ts
	reqs := p.snapshot(ts)
	p.snapshotTime.Set(time.Since(start).Seconds())
	d := &delivery{ts: ts}
	d.remaining.Store(int32(len(p.eps) * p.cfg.Shards))
	if len(p.eps) == 0 {
		p.advance(ts)
	}
	for _, ep := range p.eps {
		ep.hand(reqs, start, d)
	}
}

// delivery follows one snapshot to every shard of every endpoint, for the
// watermark (OnDelivered).
type delivery struct {
	ts int64
	// remaining counts the shards that have not finished the snapshot;
	// a shard that abandons it for a newer one never finishes it.
	remaining atomic.Int32
	// dropped is set when a request of the snapshot was rejected for good.
	dropped atomic.Bool
}

// finished records that one shard has sent its part of d, ok if no
// request was dropped, and advances the watermark when d is complete.
func (p *Pusher) finished(d *delivery, ok bool) {
	if !ok {
		d.dropped.Store(true)
	}
	if d.remaining.Add(-1) == 0 && !d.dropped.Load() {
		p.advance(d.ts)
	}
}

// advance reports ts to the OnDelivered callback unless a stamp as new
// was reported already.
func (p *Pusher) advance(ts int64) {
	if p.onDelivered == nil {
		return
	}
	p.wmMu.Lock()
	defer p.wmMu.Unlock()
	if ts <= p.wmLast {
		return
	}
	p.wmLast = ts
	p.onDelivered(ts)
}

// Wait blocks until every endpoint has sent (or given up on) everything
// handed to it, or ctx ends. With an endpoint that is down it waits for
// ctx.
func (p *Pusher) Wait(ctx context.Context) error {
	for {
		p.mu.Lock()
		if p.active == 0 {
			p.mu.Unlock()
			return nil
		}
		ch := p.idle
		p.mu.Unlock()
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for remote write: %w", ctx.Err())
		case <-ch:
		}
	}
}

// Flush is the shutdown push: it sends one last snapshot, waits for every
// endpoint until ctx ends, then stops the pusher, abandoning (and counting
// as failed) whatever is still unsent. Later pushes do nothing.
func (p *Pusher) Flush(ctx context.Context) error {
	p.Push()
	err := p.Wait(ctx)
	p.pushMu.Lock() // a concurrent Push completes or sees stopped
	p.stopped.Store(true)
	p.pushMu.Unlock()
	p.start()
	p.cancel()
	p.wg.Wait()
	return err
}

func (p *Pusher) addActive(d int) {
	p.mu.Lock()
	p.active += d
	if p.active == 0 {
		close(p.idle)
		p.idle = make(chan struct{})
	}
	p.mu.Unlock()
}

// endpoint is one receiver: its client, shards and self-metrics.
type endpoint struct {
	p      *Pusher
	name   string
	client *Client
	log    *slog.Logger
	shards []*shard

	sent, failed, dropped, retries *metrics.Counter
	zeroSamples, zerosRejected     *metrics.Counter
	lastSuccess, duration, pending *metrics.Gauge
	delivered                      *metrics.Gauge

	reg     *metrics.Registry
	codesMu sync.Mutex
	codes   map[string]*metrics.Counter

	failing     atomic.Bool
	lastDropLog atomic.Int64
	// overruns counts pushes that found an older snapshot still being
	// sent: the push took longer than its interval.
	overruns       *metrics.Counter
	lastOverrunLog atomic.Int64
	// zerosLogged is set once the first rejection of zeros was logged.
	zerosLogged atomic.Bool
}

func newEndpoint(p *Pusher, name string, c *Client, reg *metrics.Registry) *endpoint {
	ep := &endpoint{p: p, name: name, client: c, reg: reg, codes: map[string]*metrics.Counter{},
		log: p.log.With("endpoint", name)}
	el := metrics.Label{Name: "endpoint", Value: name}
	const samples = "kubezonnet_server_remote_write_samples_total"
	const samplesHelp = "Samples by outcome: sent (2xx), failed (retryable errors until replaced by a newer snapshot or shut down), dropped (rejected with a 4xx, never retried). Created-timestamp zero samples are not included (kubezonnet_server_remote_write_zero_samples_total)."
	ep.sent = reg.Counter(samples, samplesHelp, el, metrics.Label{Name: "result", Value: "sent"})
	ep.failed = reg.Counter(samples, samplesHelp, el, metrics.Label{Name: "result", Value: "failed"})
	ep.overruns = reg.Counter("kubezonnet_server_remote_write_push_overruns_total",
		"Pushes that found the endpoint still sending an older snapshot (a push longer than the interval, or retries). While every endpoint sends without errors the snapshot waits until one has sent everything; an endpoint that is retrying gets the newer snapshot in place of its unsent part.", el)
	ep.dropped = reg.Counter(samples, samplesHelp, el, metrics.Label{Name: "result", Value: "dropped"})
	ep.retries = reg.Counter("kubezonnet_server_remote_write_retries_total",
		"Requests retried after a network error, 5xx or 429.", el)
	ep.zeroSamples = reg.Counter("kubezonnet_server_remote_write_zero_samples_total",
		"Created-timestamp zero samples (value 0 at a new series' creation time, before its first sample) handed to the endpoint, on top of the samples counted in kubezonnet_server_remote_write_samples_total.", el)
	ep.zerosRejected = reg.Counter("kubezonnet_server_remote_write_zero_samples_rejected_total",
		"Created-timestamp zero samples whose request the endpoint rejected with a final 4xx other than 429 (typically as out of order: it already had the series, e.g. after a server restart); the request was resent without them.", el)
	ep.lastSuccess = reg.Gauge("kubezonnet_server_remote_write_last_success_timestamp_seconds",
		"Unix time of the last request the endpoint accepted; for the age of the data there, see kubezonnet_server_remote_write_delivered_snapshot_timestamp_seconds.", el)
	ep.delivered = reg.Gauge("kubezonnet_server_remote_write_delivered_snapshot_timestamp_seconds",
		"Unix time of the newest snapshot the endpoint accepted in full (every request answered 2xx): the receiver has every series' value as of then; alert on time() minus this.", el)
	ep.duration = reg.Gauge("kubezonnet_server_remote_write_push_duration_seconds",
		"Seconds from taking the last completely delivered snapshot to its last request being answered.", el)
	ep.pending = reg.Gauge("kubezonnet_server_remote_write_pending_samples",
		"Samples handed to the endpoint and not yet sent, dropped or given up.", el)
	for range p.cfg.Shards {
		ep.shards = append(ep.shards, &shard{ep: ep, newer: make(chan struct{}, 1),
			bo: Backoff{Min: p.cfg.MinBackoff, Max: p.cfg.MaxBackoff}})
	}
	return ep
}

// countCode counts one attempt by HTTP status ("error" when the request
// got no response). Counters are created on first use; status codes are a
// small bounded set.
func (ep *endpoint) countCode(code int) {
	k := "error"
	if code != 0 {
		k = strconv.Itoa(code)
	}
	ep.codesMu.Lock()
	c, ok := ep.codes[k]
	if !ok {
		c = ep.reg.Counter("kubezonnet_server_remote_write_requests_total",
			"Request attempts by HTTP status code; code=\"error\" means no response (network error, timeout).",
			metrics.Label{Name: "endpoint", Value: ep.name}, metrics.Label{Name: "code", Value: k})
		ep.codes[k] = c
	}
	ep.codesMu.Unlock()
	c.Inc()
}

// hand gives every shard its part of a snapshot.
func (ep *endpoint) hand(reqs [][]request, start time.Time, d *delivery) {
	tr := &pushTrack{start: start, ts: d.ts}
	tr.remaining.Store(int32(len(ep.shards)))
	zeros := 0
	overran := false
	for i, s := range ep.shards {
		b := &batch{reqs: reqs[i], track: tr, delivery: d}
		for _, r := range b.reqs {
			b.samples += r.samples
			zeros += r.zeros
		}
		if s.put(b) {
			overran = true
		}
	}
	ep.zeroSamples.Add(float64(zeros))
	if overran {
		ep.overran()
	}
}

// overran counts a push that found the endpoint still sending an older
// snapshot, and warns of it.
func (ep *endpoint) overran() {
	ep.overruns.Inc()
	ep.logOverrun()
}

// logOverrun warns that a push overran its interval, at most once a minute
// per endpoint.
func (ep *endpoint) logOverrun() {
	now := time.Now().UnixNano()
	last := ep.lastOverrunLog.Load()
	if now-last < int64(time.Minute) || !ep.lastOverrunLog.CompareAndSwap(last, now) {
		return
	}
	ep.log.Warn("remote write push overran its interval: the previous snapshot was still being sent; the next one is taken when it is done, or replaces what is not sent yet while the endpoint fails (counters are cumulative, nothing is lost)",
		"interval", ep.p.cfg.Interval, "overruns", ep.overruns.Value())
}

// pushTrack follows one snapshot's delivery to one endpoint.
type pushTrack struct {
	start     time.Time
	ts        int64 // the snapshot's stamp, milliseconds
	remaining atomic.Int32
	dropped   atomic.Bool
}

// batch is one shard's part of one snapshot.
type batch struct {
	reqs     []request
	samples  int // real samples, as request.samples
	track    *pushTrack
	delivery *delivery
}

// shard sends its batches in order, holding at most one pending.
type shard struct {
	ep *endpoint
	bo Backoff
	// newer holds a token while pending is set and not yet taken, so a
	// retry wait can notice that a newer batch replaced its data.
	newer chan struct{}

	mu      sync.Mutex
	pending *batch
	busy    bool
}

// put makes b the shard's pending batch, replacing (and counting as
// failed) a pending batch not yet started.
// It reports whether the shard was still sending an older snapshot.
func (s *shard) put(b *batch) (busy bool) {
	ep := s.ep
	s.mu.Lock()
	old := s.pending
	s.pending = b
	busy = s.busy
	if !s.busy {
		s.busy = true
		ep.p.addActive(1)
	}
	select {
	case s.newer <- struct{}{}:
	default:
	}
	s.mu.Unlock()
	ep.pending.Add(float64(b.samples))
	if old != nil {
		ep.pending.Add(-float64(old.samples))
		ep.failed.Add(float64(old.samples))
	}
	return busy
}

// take waits for the pending batch; nil when ctx ends.
func (s *shard) take(ctx context.Context) *batch {
	for {
		s.mu.Lock()
		if b := s.pending; b != nil {
			s.pending = nil
			select {
			case <-s.newer:
			default:
			}
			s.mu.Unlock()
			return b
		}
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil
		case <-s.newer:
		}
	}
}

func (s *shard) run(ctx context.Context) {
	for {
		b := s.take(ctx)
		if b == nil {
			break
		}
		s.deliver(ctx, b)
		s.mu.Lock()
		if s.pending == nil {
			s.busy = false
			s.ep.p.addActive(-1)
			select {
			case s.ep.p.freed <- struct{}{}:
			default:
			}
		}
		s.mu.Unlock()
	}
	// Shut down: whatever is still pending is lost for this endpoint.
	s.mu.Lock()
	if old := s.pending; old != nil {
		s.pending = nil
		s.ep.pending.Add(-float64(old.samples))
		s.ep.failed.Add(float64(old.samples))
	}
	s.mu.Unlock()
}

// deliver sends a batch's requests in order, retrying each as the backoff
// allows, until done, replaced by a newer batch, or shut down. A request
// whose zeros get it rejected is sent again as its fallback.
func (s *shard) deliver(ctx context.Context, b *batch) {
	ep := s.ep
	left := b.samples
	ok := true
	for _, r := range b.reqs {
		err := s.send(ctx, r.body)
		if se := rejection(err); r.fallback != nil && se != nil {
			ep.zerosRejected.Add(float64(r.zeros))
			if !ep.zerosLogged.Swap(true) {
				// Once per endpoint: after a restart every request with
				// zeros may be rejected; the counter tells how many.
				ep.log.Warn("remote write rejected a request with created-timestamp zeros, resending it without them",
					"code", se.Code, "body", se.Body, "zeros", r.zeros)
			} else {
				ep.log.Debug("remote write rejected created-timestamp zeros", "code", se.Code, "body", se.Body, "zeros", r.zeros)
			}
			err = s.send(ctx, r.fallback)
		}
		left -= r.samples
		ep.pending.Add(-float64(r.samples))
		switch {
		case err == nil:
			ep.sent.Add(float64(r.samples))
			ep.lastSuccess.Set(float64(time.Now().UnixNano()) / 1e9)
		case errors.Is(err, errSuperseded) || ctx.Err() != nil:
			ep.failed.Add(float64(r.samples + left))
			ep.pending.Add(-float64(left))
			return
		default:
			ok = false
			ep.dropped.Add(float64(r.samples))
			ep.logDrop(err, r.samples)
		}
	}
	if !ok {
		b.track.dropped.Store(true)
	}
	if b.track.remaining.Add(-1) == 0 {
		ep.duration.Set(time.Since(b.track.start).Seconds())
		if !b.track.dropped.Load() {
			ep.delivered.Set(float64(b.track.ts) / 1000)
		}
	}
	ep.p.finished(b.delivery, ok)
}

// send sends one request body, retrying as the shard's backoff allows.
func (s *shard) send(ctx context.Context, body []byte) error {
	ep := s.ep
	attempts := 0
	err := Retry(ctx, &s.bo, s.newer, func() error {
		attempts++
		code, err := ep.client.Store(ctx, body)
		ep.countCode(code)
		return err
	}, func(err error, wait time.Duration) {
		ep.retries.Inc()
		if !ep.failing.Swap(true) {
			ep.log.Warn("remote write failing, retrying", "err", err, "wait", wait)
		} else {
			ep.log.Debug("remote write retry", "err", err, "wait", wait)
		}
	})
	if err == nil && ep.failing.Swap(false) {
		ep.log.Info("remote write recovered", "attempts", attempts)
	}
	return err
}

// rejection returns err's *StatusError if err is a final rejection that a
// request's zeros may have caused: a 4xx other than 429. A 429 (when not
// retried) is a rate or tenant limit that the same samples without their
// zeros would hit as well.
func rejection(err error) *StatusError {
	if err == nil {
		return nil // the common case, without errors.As' allocation
	}
	var se *StatusError
	if errors.As(err, &se) && se.Code/100 == 4 && se.Code != http.StatusTooManyRequests {
		return se
	}
	return nil
}

// logDrop logs a rejected request, at most once per second per endpoint:
// a receiver that rejects everything would otherwise log once per
// request.
func (ep *endpoint) logDrop(err error, samples int) {
	now := time.Now().UnixNano()
	last := ep.lastDropLog.Load()
	if now-last < int64(time.Second) || !ep.lastDropLog.CompareAndSwap(last, now) {
		return
	}
	var se *StatusError
	if errors.As(err, &se) {
		ep.log.Error("remote write rejected, samples dropped", "code", se.Code, "body", se.Body, "samples", samples)
		return
	}
	ep.log.Error("remote write failed, samples dropped", "err", err, "samples", samples)
}
