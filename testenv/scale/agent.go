package scale

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// servicePorts are the destination ports flows use; with PeersPerPod they
// bound the distinct flows of a node.
var servicePorts = []uint16{80, 443, 5432, 8080}

// pair is a (source pod, destination pod) pair of the ground truth.
type pair struct{ src, dst string }

// zonePair is a (source zone, destination zone) pair.
type zonePair struct{ src, dst string }

// agent simulates the agent of one node: it generates flows from the
// node's pods to their peers and sends them as wire batches, one at a
// time, resending the same bytes until they are acknowledged.
type agent struct {
	w      *world
	node   int
	client *remotewrite.Client
	rng    *rand.Rand

	incarnation string
	seq         uint64
	enc         wire.Encoder
	// notify is woken at a release on the node: the agent drains at
	// once, as the real one does (see run). While a batch is in flight
	// (busy), the release also goes ahead as a notice (noticeWake), as
	// the real agent's does.
	notify, noticeWake chan struct{}
	busy               atomic.Bool
	sentSeq            atomic.Uint64 // seq, for the notices' header
	notices            *remotewrite.Client
	noticeEnc          wire.Encoder

	// ready holds batches encoded before the sending (Options.Pregenerate),
	// sent in order (sent of them acknowledged so far); with it, run
	// neither generates nor encodes, and the truth is tallied once the
	// sending is over (tallyReady).
	ready []readyBatch
	sent  int

	// Outcome, read once the agent returned.
	truth   map[pair]flow.Counts
	zones   map[zonePair]flow.Counts
	flows   int64
	batches int64
	// releaseBatches carried a release alone (see run); noticesSent are
	// the notices the server accepted.
	releaseBatches int64
	noticesSent    atomic.Int64
	retries        int64
	latencies      []time.Duration // every POST attempt's round trip, flow batches only
	lastAck        time.Time
}

func newAgent(w *world, node int, serverURL string, seed uint64) (*agent, error) {
	c, err := remotewrite.NewClient(remotewrite.EndpointConfig{
		Name: "server", URL: serverURL + "/api/v1/write", Timeout: 30 * time.Second,
	}, remotewrite.ClientOptions{RetryOn429: true, Component: "scale-agent"})
	if err != nil {
		return nil, fmt.Errorf("creating the client of simulated agent %d: %w", node, err)
	}
	var raw [8]byte
	if _, err := crand.Read(raw[:]); err != nil {
		return nil, fmt.Errorf("choosing an incarnation: %w", err)
	}
	a := &agent{
		w: w, node: node, client: c, rng: rand.New(rand.NewPCG(seed, uint64(node))),
		incarnation: hex.EncodeToString(raw[:]), notify: make(chan struct{}, 1), noticeWake: make(chan struct{}, 1),
		truth: map[pair]flow.Counts{}, zones: map[zonePair]flow.Counts{},
	}
	if a.notices, err = remotewrite.NewClient(remotewrite.EndpointConfig{
		Name: "server-releases", URL: serverURL + wire.ReleasesPath, Timeout: 5 * time.Second,
	}, remotewrite.ClientOptions{Component: "scale-agent"}); err != nil {
		return nil, fmt.Errorf("creating the notice client of simulated agent %d: %w", node, err)
	}
	w.relMu.Lock()
	w.onRelease[node] = a.released
	w.relMu.Unlock()
	return a, nil
}

// released is told of a release on the node (under the world's relMu).
func (a *agent) released() {
	wake(a.notify)
	if a.busy.Load() {
		wake(a.noticeWake)
	}
}

// wake signals ch, a channel of one slot, unless it is signalled already.
func wake(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default: // already woken
	}
}

// sendNotices posts a notice of the node's pending releases each time it
// is woken, until ctx ends: best effort, as the real agent's.
func (a *agent) sendNotices(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.noticeWake:
		}
		rels := a.w.pendingReleases(a.node)
		if len(rels) == 0 {
			continue
		}
		b := wire.Batch{Node: nodeName(a.node), Incarnation: a.incarnation, Seq: a.sentSeq.Load() + 1, Time: time.Now(), Released: rels}
		body := a.noticeEnc.Encode(&b)
		sent := time.Now()
		if _, err := a.notices.Store(ctx, body); err == nil {
			a.noticesSent.Add(1)
			a.w.noteReported(rels, "notice", sent, time.Now())
		}
	}
}

// generated is a batch and the pods its flows are attributed to, by name
// and by slot.
type generated struct {
	batch wire.Batch
	pods  []pair
	slots [][2]int32
}

// generate makes a batch of up to n flows from the node's pods to their
// peers, attributed to the pods holding the addresses now. Flows with the
// same key are merged, as the agent's drain merges them.
//
// The batch carries the addresses of the node released since the last
// one, as the agent's does, and no flow of them: the agent drains when it
// sees a release, so the batch that reports it holds only what came
// before (here nothing: the slot was vacant), and a successor's traffic
// comes in later batches.
func (a *agent) generate(n int) generated {
	w := a.w
	P := w.opts.PodsPerNode
	var g generated
	index := map[flow.Key]int{}
	w.mu.RLock()
	g.batch.Released = w.takeReleased(a.node)
	for try := 0; try < 4*n && len(index) < n; try++ {
		si := a.node*P + a.rng.IntN(P)
		s := &w.slots[si]
		if s.vacant || released(g.batch.Released, s.ip) {
			continue
		}
		di := s.peers[a.rng.IntN(len(s.peers))]
		d := &w.slots[di]
		if d.vacant || released(g.batch.Released, d.ip) {
			continue
		}
		k := flow.Key{Src: s.ip, Dst: d.ip, Proto: 6, Port: servicePorts[a.rng.IntN(len(servicePorts))], PortIsDst: true}
		bytes := uint64(40 + a.rng.IntN(200_000))
		c := flow.Counts{Bytes: bytes, Packets: 1 + bytes/1448}
		if i, ok := index[k]; ok {
			g.batch.Flows[i].Counts.Add(c)
			continue
		}
		index[k] = len(g.batch.Flows)
		g.batch.Flows = append(g.batch.Flows, flow.Record{Key: k, Counts: c})
		g.pods = append(g.pods, pair{s.pod, d.pod})
		g.slots = append(g.slots, [2]int32{int32(si), int32(di)})
	}
	// Stamped after the attribution and before the lock is released: a
	// flow belongs to the pods that held the addresses at its time, and a
	// replacement (which takes the lock) releases an address only after
	// it. Stamped after the unlock, a batch could carry flows of a pod
	// with a time after the pod's release.
	g.batch.Time = time.Now()
	w.mu.RUnlock()
	return g
}

// released reports whether rs holds ip.
func released(rs []wire.Release, ip netip.Addr) bool {
	return slices.ContainsFunc(rs, func(r wire.Release) bool { return r.Addr == ip })
}

// readyBatch is a batch encoded before the sending, with its flows'
// slots and counts (no pointers: millions of them cost the collector
// nothing while the batches are sent).
type readyBatch struct {
	body  []byte
	flows []slotFlow
}

// slotFlow is a flow of a pregenerated batch: its source and destination
// slots and its counts.
type slotFlow struct {
	src, dst int32
	c        flow.Counts
}

// pregenerate generates and encodes n batches of up to flowsPerBatch flows
// for run to send, so that sending costs this process only the requests:
// the offered rate can then exceed what generating and encoding on the
// machine's other cores would allow. The flows are attributed to the pods
// holding their addresses now, so the world must not churn afterwards.
func (a *agent) pregenerate(n, flowsPerBatch int) {
	a.ready = make([]readyBatch, 0, n)
	for range n {
		g := a.generate(flowsPerBatch)
		a.seq++
		g.batch.Node, g.batch.Incarnation, g.batch.Seq = nodeName(a.node), a.incarnation, a.seq
		// Encode returns its buffer, which the next call reuses.
		r := readyBatch{body: slices.Clone(a.enc.Encode(&g.batch)), flows: make([]slotFlow, len(g.slots))}
		for i, sl := range g.slots {
			r.flows[i] = slotFlow{sl[0], sl[1], g.batch.Flows[i].Counts}
		}
		a.ready = append(a.ready, r)
	}
}

// tallyReady adds the pregenerated batches acknowledged to the truth,
// naming the pods that held the slots (the world did not churn).
func (a *agent) tallyReady() {
	w := a.w
	for _, r := range a.ready[:a.sent] {
		for _, f := range r.flows {
			s, d := &w.slots[f.src], &w.slots[f.dst]
			p := pair{s.pod, d.pod}
			c := a.truth[p]
			c.Add(f.c)
			a.truth[p] = c
			zp := zonePair{w.zoneOf(s.node), w.zoneOf(d.node)}
			z := a.zones[zp]
			z.Add(f.c)
			a.zones[zp] = z
		}
		a.flows += int64(len(r.flows))
	}
}

// tally adds the flows of g, acknowledged, to the truth.
func (a *agent) tally(g generated) {
	for i, f := range g.batch.Flows {
		p := g.pods[i]
		c := a.truth[p]
		c.Add(f.Counts)
		a.truth[p] = c
		zp := zonePair{a.w.zoneOf(a.node), a.w.zoneOf(a.w.nodeOfPod(f.Dst))}
		z := a.zones[zp]
		z.Add(f.Counts)
		a.zones[zp] = z
	}
}

// run sends batches at one per interval until stop is closed, then
// returns once the batch in flight is acknowledged. ctx ends everything,
// in-flight batch included.
//
// A release on the node is sent at once, as the real agent drains and
// sends when it sees one, in a batch of its own: here without flows (so
// the offered rate stays the scheduled batches'), the next scheduled
// batch carrying the traffic.
func (a *agent) run(ctx context.Context, interval time.Duration, flowsPerBatch int, stop <-chan struct{}) error {
	backoff := &remotewrite.Backoff{Min: 100 * time.Millisecond, Max: 2 * time.Second}
	noticeCtx, stopNotices := context.WithCancel(ctx)
	defer stopNotices()
	go a.sendNotices(noticeCtx)
	next := time.Now().Add(time.Duration(a.rng.Int64N(int64(interval)))) // spread the agents
	for {
		t := time.NewTimer(time.Until(next))
		released := false
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-stop:
			t.Stop()
			return nil
		case <-a.notify:
			t.Stop()
			released = a.ready == nil
		case <-t.C:
		}
		var body []byte
		var g generated // the batch generated now, without Pregenerate
		switch {
		case released:
			g = a.generate(0)
			if len(g.batch.Released) == 0 {
				continue // taken by a batch in between
			}
			a.seq++
			g.batch.Node, g.batch.Incarnation, g.batch.Seq = nodeName(a.node), a.incarnation, a.seq
			body = a.enc.Encode(&g.batch)
		case a.ready != nil:
			if a.sent == len(a.ready) {
				return nil // every pregenerated batch was sent
			}
			body = a.ready[a.sent].body
		default:
			g = a.generate(flowsPerBatch)
			a.seq++
			g.batch.Node, g.batch.Incarnation, g.batch.Seq = nodeName(a.node), a.incarnation, a.seq
			body = a.enc.Encode(&g.batch)
		}
		a.sentSeq.Store(a.seq)
		a.busy.Store(true)
		if a.w.hasPendingReleases(a.node) {
			// Seen just before: it waits for this batch too.
			wake(a.noticeWake)
		}
		sent := time.Now()
		err := remotewrite.Retry(ctx, backoff, nil, func() error {
			start := time.Now()
			_, err := a.client.Store(ctx, body)
			if !released {
				// The latency measured is flow batches' (a release
				// alone is a small request).
				a.latencies = append(a.latencies, time.Since(start))
			}
			return err
		}, func(error, time.Duration) { a.retries++ })
		a.busy.Store(false)
		if err != nil {
			var se *remotewrite.StatusError
			if errors.As(err, &se) {
				return fmt.Errorf("node %s batch %d refused: %w", nodeName(a.node), a.seq, err)
			}
			return err
		}
		a.lastAck = time.Now()
		a.w.noteReported(g.batch.Released, "batch", sent, a.lastAck)
		if released {
			a.releaseBatches++
			continue // the schedule goes on
		}
		a.batches++
		// Acknowledged: what the batch carries joins the truth.
		if a.ready != nil {
			a.sent++
		} else {
			a.flows += int64(len(g.batch.Flows))
			a.tally(g)
			a.w.noteSent(g.pods, a.node, sent, a.lastAck)
		}
		// A batch that took longer than the interval is followed at once
		// by the next: the offered rate is an upper bound, and the
		// achieved rate tells how far the server kept up.
		next = next.Add(interval)
		if now := time.Now(); next.Before(now) {
			next = now
		}
	}
}
