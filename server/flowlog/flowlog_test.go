package flowlog

import (
	"context"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

var (
	web = &resolve.Endpoint{Kind: resolve.KindPod, Namespace: "shop", Pod: "web-1", Workload: "web", WorkloadKind: "Deployment", Node: "node-a", Zone: "zone-a"}
	db  = &resolve.Endpoint{Kind: resolve.KindPod, Namespace: "shop", Pod: "db-0", Workload: "db", WorkloadKind: "StatefulSet", Node: "node-b", Zone: "zone-b"}
	// odd has names needing JSON escaping, which Kubernetes never produces
	// but a static endpoints file might.
	odd = &resolve.Endpoint{Kind: resolve.KindStatic, Workload: "rds \"main\"\n\\ü\xff", WorkloadKind: "Static", Zone: "zone-c"}
)

func TestEventsParseBack(t *testing.T) {
	out := &testutil.SyncBuffer{}
	reg := metrics.New()
	set, err := ParseClasses([]string{"cross-zone", "external"})
	if err != nil {
		t.Fatal(err)
	}
	l := New(Config{Classes: set}, out, reg)
	ctx, cancel := context.WithCancel(context.Background())
	go l.Run(ctx)

	at := time.Date(2026, 1, 2, 3, 4, 5, 600_000_000, time.UTC)
	events := []Event{
		{Time: at, Node: "node-a", Src: web, Dst: db, Class: resolve.ClassCrossZone, Record: flow.Record{
			Key:    flow.Key{Src: netip.MustParseAddr("10.0.1.1"), Dst: netip.MustParseAddr("10.0.2.1"), Proto: 6, Port: 5432, PortIsDst: true},
			Counts: flow.Counts{Bytes: 123456789012, Packets: 77}}},
		{Time: at, Node: "node-a", Src: web, Dst: odd, Class: resolve.ClassExternal, Record: flow.Record{
			Key:    flow.Key{Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("2001:db8::5"), Proto: 58},
			Counts: flow.Counts{Bytes: 64, Packets: 1}}},
	}
	if !l.Enabled(resolve.ClassCrossZone) || !l.Enabled(resolve.ClassExternal) || l.Enabled(resolve.ClassSameZone) || l.Enabled(resolve.ClassUnknown) {
		t.Fatalf("class set %b does not match cross-zone,external", set)
	}
	batch := l.Buffer()
	batch.Events = append(batch.Events, events...)
	l.Send(batch)
	cancel()
	<-l.Done()

	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines, want 2:\n%s", len(lines), out.String())
	}
	want := []map[string]any{{
		"time": "2026-01-02T03:04:05.6Z", "level": "INFO", "msg": "flow", "node": "node-a",
		"src_namespace": "shop", "src_pod": "web-1", "src_workload": "web", "src_node": "node-a", "src_zone": "zone-a", "src_ip": "10.0.1.1",
		"dst_namespace": "shop", "dst_pod": "db-0", "dst_workload": "db", "dst_node": "node-b", "dst_zone": "zone-b", "dst_ip": "10.0.2.1",
		"port": 5432.0, "proto": "tcp", "bytes": 123456789012.0, "packets": 77.0, "class": "cross-zone",
	}, {
		"time": "2026-01-02T03:04:05.6Z", "level": "INFO", "msg": "flow", "node": "node-a",
		"src_namespace": "shop", "src_pod": "web-1", "src_workload": "web", "src_node": "node-a", "src_zone": "zone-a", "src_ip": "fd00::1",
		"dst_namespace": "", "dst_pod": "", "dst_workload": "rds \"main\"\n\\ü\ufffd", "dst_node": "", "dst_zone": "zone-c", "dst_ip": "2001:db8::5",
		"port": 0.0, "proto": "icmpv6", "bytes": 64.0, "packets": 1.0, "class": "external",
	}}
	for i, line := range lines {
		var got map[string]any
		if err := json.Unmarshal([]byte(line), &got); err != nil {
			t.Fatalf("line %d is not JSON: %v\n%s", i, err, line)
		}
		for k, v := range want[i] {
			if got[k] != v {
				t.Errorf("line %d: %s = %#v, want %#v", i, k, got[k], v)
			}
		}
		if len(got) != len(want[i]) {
			t.Errorf("line %d has %d keys, want %d: %s", i, len(got), len(want[i]), line)
		}
	}
	if v := l.logged.Value(); v != 2 {
		t.Errorf("logged = %v, want 2", v)
	}
}

// blockingWriter holds the writer goroutine until released, to fill the
// queue deterministically.
type blockingWriter struct{ release chan struct{} }

func (w blockingWriter) Write(p []byte) (int, error) {
	<-w.release
	return len(p), nil
}

func TestSendNeverBlocks(t *testing.T) {
	w := blockingWriter{release: make(chan struct{})}
	l := New(Config{Classes: 0xff, QueueBatches: 2}, w, metrics.New())
	// Without Run nothing drains the queue: two batches fit, the rest
	// are dropped and counted, and Send returns every time.
	ev := Event{Src: web, Dst: db, Class: resolve.ClassCrossZone}
	for range 5 {
		batch := l.Buffer()
		batch.Events = append(batch.Events, ev, ev, ev)
		l.Send(batch)
	}
	if v := l.dropped.Value(); v != 9 {
		t.Errorf("dropped = %v, want 9", v)
	}
	close(w.release)
}

func TestParseClasses(t *testing.T) {
	for _, tc := range []struct {
		in      []string
		want    []string
		wantErr string
	}{
		{in: []string{"cross-zone"}, want: []string{"cross-zone"}},
		{in: []string{"all"}, want: resolve.ClassNames()},
		{in: []string{"none"}},
		{in: []string{"same-zone", " unknown"}, want: []string{"same-zone", "unknown"}},
		{in: []string{"cross_zone"}, wantErr: `unknown traffic class "cross_zone"`},
	} {
		set, err := ParseClasses(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: err %v, want %q", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%q: %v", tc.in, err)
		}
		for c := range resolve.NumClasses {
			want := false
			for _, w := range tc.want {
				want = want || w == c.String()
			}
			if set.Has(c) != want {
				t.Errorf("%q: Has(%s) = %v, want %v", tc.in, c, set.Has(c), want)
			}
		}
	}
}
