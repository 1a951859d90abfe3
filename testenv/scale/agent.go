package scale

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
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

	// ready holds batches encoded before the sending (Options.Pregenerate),
	// sent in order; with it, run neither generates nor encodes.
	ready []readyBatch

	// Outcome, read once the agent returned.
	truth     map[pair]flow.Counts
	zones     map[zonePair]flow.Counts
	flows     int64
	batches   int64
	retries   int64
	latencies []time.Duration // every POST attempt's round trip
	lastAck   time.Time
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
	return &agent{
		w: w, node: node, client: c, rng: rand.New(rand.NewPCG(seed, uint64(node))),
		incarnation: hex.EncodeToString(raw[:]),
		truth:       map[pair]flow.Counts{}, zones: map[zonePair]flow.Counts{},
	}, nil
}

// generated is a batch and the pods its flows are attributed to.
type generated struct {
	batch wire.Batch
	pods  []pair
}

// generate makes a batch of up to n flows from the node's pods to their
// peers, attributed to the pods holding the addresses now. Flows with the
// same key are merged, as the agent's drain merges them.
func (a *agent) generate(n int) generated {
	w := a.w
	P := w.opts.PodsPerNode
	var g generated
	index := map[flow.Key]int{}
	w.mu.RLock()
	for try := 0; try < 4*n && len(index) < n; try++ {
		s := &w.slots[a.node*P+a.rng.IntN(P)]
		if s.vacant {
			continue
		}
		d := &w.slots[s.peers[a.rng.IntN(len(s.peers))]]
		if d.vacant {
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
	}
	w.mu.RUnlock()
	// Stamped after the attribution: a flow belongs to the pods that held
	// the addresses at its time.
	g.batch.Time = time.Now()
	return g
}

// readyBatch is a batch encoded before the sending, with what it adds to
// the ground truth once acknowledged.
type readyBatch struct {
	body  []byte
	flows int
	truth map[pair]flow.Counts
	zones map[zonePair]flow.Counts
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
		r := readyBatch{body: slices.Clone(a.enc.Encode(&g.batch)), flows: len(g.batch.Flows), truth: map[pair]flow.Counts{}, zones: map[zonePair]flow.Counts{}}
		a.tally(r.truth, r.zones, g)
		a.ready = append(a.ready, r)
	}
}

// tally adds the flows of g to truth and zones.
func (a *agent) tally(truth map[pair]flow.Counts, zones map[zonePair]flow.Counts, g generated) {
	for i, f := range g.batch.Flows {
		p := g.pods[i]
		c := truth[p]
		c.Add(f.Counts)
		truth[p] = c
		zp := zonePair{a.w.zoneOf(a.node), a.w.zoneOf(a.w.nodeOfPod(f.Dst))}
		z := zones[zp]
		z.Add(f.Counts)
		zones[zp] = z
	}
}

// run sends batches at one per interval until stop is closed, then
// returns once the batch in flight is acknowledged. ctx ends everything,
// in-flight batch included.
func (a *agent) run(ctx context.Context, interval time.Duration, flowsPerBatch int, stop <-chan struct{}) error {
	backoff := &remotewrite.Backoff{Min: 100 * time.Millisecond, Max: 2 * time.Second}
	next := time.Now().Add(time.Duration(a.rng.Int64N(int64(interval)))) // spread the agents
	for {
		t := time.NewTimer(time.Until(next))
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-stop:
			t.Stop()
			return nil
		case <-t.C:
		}
		var r readyBatch
		var g generated // the batch generated now, without Pregenerate
		if a.ready != nil {
			if len(a.ready) == 0 {
				return nil // every pregenerated batch was sent
			}
			r, a.ready[0] = a.ready[0], readyBatch{}
			a.ready = a.ready[1:]
		} else {
			g = a.generate(flowsPerBatch)
			a.seq++
			g.batch.Node, g.batch.Incarnation, g.batch.Seq = nodeName(a.node), a.incarnation, a.seq
			r = readyBatch{body: a.enc.Encode(&g.batch), flows: len(g.batch.Flows)}
		}
		body := r.body
		err := remotewrite.Retry(ctx, backoff, nil, func() error {
			start := time.Now()
			_, err := a.client.Store(ctx, body)
			a.latencies = append(a.latencies, time.Since(start))
			return err
		}, func(error, time.Duration) { a.retries++ })
		if err != nil {
			var se *remotewrite.StatusError
			if errors.As(err, &se) {
				return fmt.Errorf("node %s batch %d refused: %w", nodeName(a.node), a.seq, err)
			}
			return err
		}
		a.lastAck = time.Now()
		a.batches++
		a.flows += int64(r.flows)
		// Acknowledged: what the batch carries joins the truth.
		if r.truth != nil {
			merge(a.truth, r.truth)
			merge(a.zones, r.zones)
		} else {
			a.tally(a.truth, a.zones, g)
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

// merge adds the counts of src to dst.
func merge[K comparable](dst, src map[K]flow.Counts) {
	for k, c := range src {
		t := dst[k]
		t.Add(c)
		dst[k] = t
	}
}
