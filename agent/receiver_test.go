package agent

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// pair is a (source, destination) address pair.
type pair struct{ src, dst netip.Addr }

// receiver is a test stand-in for the server's ingest: it checks the
// remote-write headers, decodes every request with internal/wire and
// applies the documented de-duplication contract (highest seq per
// incarnation). decide chooses the answer for the n-th request (from 1)
// and whether the batch is applied before answering.
type receiver struct {
	t  *testing.T
	mu sync.Mutex
	// decide returns the status to answer and whether to apply the batch.
	decide   func(n int) (status int, apply bool)
	requests int
	lastSeq  map[string]uint64
	bodies   map[uint64][]byte
	resent   int // requests that repeated an earlier seq byte for byte
	flows    map[pair]flow.Counts
	total    flow.Counts
	batches  []wire.Batch
	notices  []wire.Batch // release notices, in arrival order
	srv      *httptest.Server
}

func newReceiver(t *testing.T, decide func(n int) (int, bool)) *receiver {
	r := &receiver{t: t, decide: decide, lastSeq: map[string]uint64{}, bodies: map[uint64][]byte{}, flows: map[pair]flow.Counts{}}
	if r.decide == nil {
		r.decide = func(int) (int, bool) { return http.StatusNoContent, true }
	}
	r.srv = httptest.NewServer(http.HandlerFunc(r.handle))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *receiver) handle(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	for h, want := range map[string]string{
		"Content-Type":            remotewrite.ContentType,
		"Content-Encoding":        remotewrite.ContentEncoding,
		remotewrite.HeaderVersion: remotewrite.ProtocolVersion,
	} {
		if got := req.Header.Get(h); got != want {
			r.t.Errorf("header %s = %q, want %q", h, got, want)
		}
	}
	if (req.URL.Path != "/api/v1/write" && req.URL.Path != wire.ReleasesPath) || req.Method != http.MethodPost {
		r.t.Errorf("request %s %s", req.Method, req.URL.Path)
	}
	var d wire.Decoder
	var b wire.Batch
	if err := d.Decode(body, &b); err != nil {
		r.t.Errorf("agent sent an undecodable request: %v", err)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if req.URL.Path == wire.ReleasesPath {
		// A release notice: recorded, nothing applied.
		if len(b.Flows) > 0 {
			r.t.Errorf("release notice with %d flows", len(b.Flows))
		}
		r.notices = append(r.notices, b)
		w.WriteHeader(http.StatusNoContent)
		return
	}
	r.requests++
	if prev, ok := r.bodies[b.Seq]; ok {
		if string(prev) != string(body) {
			r.t.Errorf("seq %d resent with a different body", b.Seq)
		}
		r.resent++
	}
	r.bodies[b.Seq] = append([]byte(nil), body...)
	status, apply := r.decide(r.requests)
	if apply && b.Seq > r.lastSeq[b.Incarnation] {
		r.lastSeq[b.Incarnation] = b.Seq
		for _, f := range b.Flows {
			p := pair{f.Src, f.Dst}
			c := r.flows[p]
			c.Add(f.Counts)
			r.flows[p] = c
			r.total.Add(f.Counts)
		}
		b.Flows = append([]flow.Record(nil), b.Flows...)
		r.batches = append(r.batches, b)
	}
	w.WriteHeader(status)
	if status >= 400 {
		io.WriteString(w, "test receiver refuses this request")
	}
}

func (r *receiver) snapshot() (flow.Counts, map[pair]flow.Counts, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := make(map[pair]flow.Counts, len(r.flows))
	for k, v := range r.flows {
		m[k] = v
	}
	return r.total, m, r.requests
}
