package flowlog

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// slogEvent writes e through a log/slog handler, attribute for attribute
// what AppendEvent writes: the reference AppendEvent is held to, and its
// benchmark's baseline.
func slogEvent(h slog.Handler, e *Event) error {
	r := slog.NewRecord(e.Time.UTC(), slog.LevelInfo, "flow", 0)
	r.AddAttrs(slog.String("node", e.Node))
	for _, side := range []struct {
		name string
		ep   *resolve.Endpoint
		ip   netip.Addr
	}{{"src", e.Src, e.Key.Src}, {"dst", e.Dst, e.Key.Dst}} {
		ep := side.ep
		if ep == nil {
			ep = &resolve.Endpoint{}
		}
		r.AddAttrs(
			slog.String(side.name+"_namespace", ep.Namespace), slog.String(side.name+"_pod", ep.Pod),
			slog.String(side.name+"_workload", ep.Workload), slog.String(side.name+"_node", ep.Node),
			slog.String(side.name+"_zone", ep.Zone), slog.String(side.name+"_ip", side.ip.String()))
	}
	r.AddAttrs(slog.Uint64("port", uint64(e.Port)), slog.String("proto", flow.ProtoName(e.Proto)),
		slog.Uint64("bytes", e.Bytes), slog.Uint64("packets", e.Packets), slog.String("class", e.Class.String()))
	if e.Service != nil {
		r.AddAttrs(slog.String("service_namespace", e.Service.Namespace), slog.String("service", e.Service.Name),
			slog.Bool("avoidable", e.Avoidable))
	}
	return h.Handle(context.Background(), r)
}

func benchEvent() Event {
	return Event{Time: time.Date(2026, 1, 2, 3, 4, 5, 600_000_000, time.UTC), Node: "node-a", Src: web, Dst: db, Class: resolve.ClassCrossZone,
		Record: flow.Record{Key: flow.Key{Src: netip.MustParseAddr("10.0.1.1"), Dst: netip.MustParseAddr("10.0.2.1"), Proto: 6, Port: 5432, PortIsDst: true},
			Counts: flow.Counts{Bytes: 123456789012, Packets: 77}}}
}

// TestAppendEventMatchesSlog: the hand-written line holds the same JSON
// object as log/slog's JSON handler writes for the event, names with
// characters to escape included.
func TestAppendEventMatchesSlog(t *testing.T) {
	e := benchEvent()
	odd := e
	odd.Dst = &resolve.Endpoint{Kind: resolve.KindStatic, Workload: "rds \"main\"\n\\ü\x01", WorkloadKind: "Static", Zone: "zone-c"}
	svc := e
	svc.Service, svc.Avoidable = &resolve.Service{Namespace: "shop", Name: "db", TrafficDistribution: "PreferSameZone"}, true
	for _, ev := range []Event{e, odd, svc} {
		var want bytes.Buffer
		if err := slogEvent(slog.NewJSONHandler(&want, nil), &ev); err != nil {
			t.Fatal(err)
		}
		var got, exp map[string]any
		if err := json.Unmarshal(AppendEvent(nil, &ev), &got); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(want.Bytes(), &exp); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, exp) {
			t.Errorf("AppendEvent:\n got %v\nslog %v", got, exp)
		}
	}
}

// BenchmarkAppendEvent formats one flow event: direct is AppendEvent,
// slog the same event through log/slog's JSON handler, the baseline that
// tells what the hand-written line saves the flow log.
func BenchmarkAppendEvent(b *testing.B) {
	e := benchEvent()
	b.Run("direct", func(b *testing.B) {
		var buf []byte
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			buf = AppendEvent(buf[:0], &e)
		}
	})
	b.Run("slog", func(b *testing.B) {
		h := slog.NewJSONHandler(io.Discard, nil)
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if err := slogEvent(h, &e); err != nil {
				b.Fatal(err)
			}
		}
	})
}
