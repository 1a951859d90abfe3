package server

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/golang/snappy"

	"github.com/kubezonnet/kubezonnet/internal/logging"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// FuzzIngest sends arbitrary bodies through the whole ingest handler
// (decode, dedup, resolve, aggregate). It must answer 204, 400 or 413,
// never panic, and a refused body must leave no series behind.
func FuzzIngest(f *testing.F) {
	f.Add(encode(batch("node-a", 1, rec("10.0.1.1", "10.0.2.1", 5432, 1500, 3))))
	f.Add(encode(batch("node-b", 3, rec("10.0.1.1", "10.0.2.1", 5432, 1, 1), rec("8.8.8.8", "10.0.2.1", 53, 1, 1))))
	f.Add(snappy.Encode(nil, []byte("\x0a\x02\x0a\x00")))
	f.Add([]byte("garbage"))

	res := newFakeResolver()
	res.add("10.0.1.1", podEP("shop", "web-1", "web", "Deployment", "node-a", "zone-a"))
	res.add("10.0.2.1", podEP("shop", "db-0", "db", "StatefulSet", "node-b", "zone-b"))
	f.Fuzz(func(t *testing.T, body []byte) {
		cfg := testConfig()
		// A 5-byte snappy header may claim a 64 MiB body; keep each run
		// small so the fuzzer spends its time on parsing.
		cfg.Limits = wire.Limits{MaxDecodedBytes: 1 << 20}
		srv, err := newServer(&cfg, deps{resolver: res, auth: noAuth{}, reg: metrics.New(), log: logging.Discard()})
		if err != nil {
			t.Fatal(err)
		}
		r := httptest.NewRequest(http.MethodPost, "/api/v1/write", bytes.NewReader(body))
		r.Header.Set("Content-Type", remotewrite.ContentType)
		r.Header.Set("Content-Encoding", remotewrite.ContentEncoding)
		w := httptest.NewRecorder()
		srv.Handler().ServeHTTP(w, r)
		switch w.Code {
		case http.StatusNoContent:
		case http.StatusBadRequest, http.StatusRequestEntityTooLarge:
			if w.Body.Len() == 0 {
				t.Fatalf("%d without a message", w.Code)
			}
			if n := len(srv.agg.AppendSeries(nil)); n != 0 {
				t.Fatalf("refused body (%d %s) left %d series", w.Code, w.Body, n)
			}
		default:
			t.Fatalf("unexpected status %d: %s", w.Code, w.Body)
		}
	})
}
