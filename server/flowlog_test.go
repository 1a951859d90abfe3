package server

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/kubezonnet/kubezonnet/internal/logging"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
	"github.com/kubezonnet/kubezonnet/server/flowlog"
)

// TestIngestFlowLog checks that ingest logs exactly the flows of the
// configured classes, each with its own addresses and port (a dropped
// foreign flow before it must not shift which record is logged).
func TestIngestFlowLog(t *testing.T) {
	env := newTestEnv(t, testConfig(), noAuth{}) // for the resolver table
	cfg := testConfig()
	cfg.FlowLogClasses, _ = flowlog.ParseClasses([]string{"cross-zone"})
	out := &testutil.SyncBuffer{}
	srv, err := newServer(&cfg, deps{resolver: env.res, auth: noAuth{}, reg: metrics.New(), log: logging.Discard(), flowLog: out})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go srv.runFlowLog(ctx)
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(hs.Close)
	e := &testEnv{srv: srv, url: hs.URL, reg: metrics.New()}
	body := encode(batch("node-a", 1,
		rec("10.0.2.1", "10.0.1.1", 9999, 1, 1),   // db-0 is on node-b: foreign, dropped
		rec("10.0.1.1", "10.0.1.9", 6379, 400, 2), // same-zone: not logged
		rec("10.0.1.2", "10.0.2.1", 5432, 1500, 3)))
	if code, msg := e.do(t, req{body: body}); code != http.StatusNoContent {
		t.Fatalf("%d %s", code, msg)
	}
	cancel()
	<-srv.flog.Done()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 1 {
		t.Fatalf("%d lines, want 1:\n%s", len(lines), out.String())
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"node": "node-a", "src_pod": "web-2", "src_ip": "10.0.1.2", "src_zone": "zone-a",
		"dst_pod": "db-0", "dst_ip": "10.0.2.1", "dst_zone": "zone-b", "dst_node": "node-b",
		"port": 5432.0, "proto": "tcp", "bytes": 1500.0, "packets": 3.0, "class": "cross-zone",
		"time": "2023-11-14T22:13:20Z",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %#v, want %#v", k, got[k], v)
		}
	}
}
