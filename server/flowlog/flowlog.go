// Package flowlog writes one structured JSON event per resolved flow, for
// the N-to-N questions that aggregated series cannot answer ("which pods of
// web talked to which replica of db across zones at 10:42?").
//
// Logging never slows ingest down: the ingest path hands a whole batch of
// events to a bounded channel without waiting, and one writer goroutine
// formats and writes them. When the writer falls behind, whole batches are
// dropped and counted in kubezonnet_server_flow_log_dropped_total.
//
// Each line is the JSON object log/slog's JSON handler would print for a
// record with message "flow" and the attributes below (time, level, msg,
// then the keys in this order; time is the agent's observation time, in
// UTC). The line is appended by a specialised
// encoder rather than through slog.Handler: the generic handler's cost per
// 17-attribute record would cap the server far below its target with
// logging on.
//
// Keys: src_namespace, src_pod, src_workload, src_node, src_zone, src_ip,
// dst_namespace, dst_pod, dst_workload, dst_node, dst_zone, dst_ip, port,
// proto, bytes, packets, class (plus node: the reporting agent's node).
// Empty values are written as "".
package flowlog

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// ClassSet is a set of traffic classes, a bit per resolve.Class: small
// enough to test per flow for free.
type ClassSet uint8

// ParseClasses parses a list such as ["cross-zone","external"]; "all"
// selects every class and "none" (or an empty list) disables logging.
func ParseClasses(list []string) (ClassSet, error) {
	var s ClassSet
	for _, name := range list {
		name = strings.TrimSpace(name)
		switch name {
		case "all":
			s = 1<<resolve.NumClasses - 1
			continue
		case "none", "":
			continue
		}
		c, err := resolve.ParseClass(name)
		if err != nil {
			return 0, fmt.Errorf("flow log classes: %w (or all, none)", err)
		}
		s |= 1 << c
	}
	return s, nil
}

// Has reports whether class is in the set.
func (s ClassSet) Has(class resolve.Class) bool { return s&(1<<class) != 0 }

// Event is one flow to log. It holds pointers to shared, immutable
// endpoints, so queuing it copies no strings.
type Event struct {
	// Time is when the agent observed the flow (its batch time).
	Time time.Time
	// Node is the node of the agent that reported the flow.
	Node     string
	Src, Dst *resolve.Endpoint
	flow.Record
	Class resolve.Class
	// Service is the Service the flow was addressed to, nil for none;
	// Avoidable as in aggregate.Flow.
	Service   *resolve.Service
	Avoidable bool
}

// Batch is the events of one agent batch, queued as a whole. It is handed
// around by pointer so the logger can reuse it through a sync.Pool without
// allocating: a pool of bare slices boxes each slice header on Put.
type Batch struct {
	Events []Event
}

// Config configures a Logger.
type Config struct {
	// Classes selects which classes are logged.
	Classes ClassSet
	// QueueBatches bounds the batches waiting for the writer (default 256).
	QueueBatches int
}

// Logger queues and writes flow events. Start Run in a goroutine; use
// Close-by-context to stop it.
type Logger struct {
	classes ClassSet
	ch      chan *Batch
	pool    sync.Pool
	w       *bufio.Writer
	buf     []byte

	logged  *metrics.Counter
	dropped *metrics.Counter
	errors  *metrics.Counter
	done    chan struct{}
}

// New returns a logger writing to w and registering its counters in reg.
func New(cfg Config, w io.Writer, reg *metrics.Registry) *Logger {
	if cfg.QueueBatches <= 0 {
		cfg.QueueBatches = 256
	}
	l := &Logger{
		classes: cfg.Classes,
		ch:      make(chan *Batch, cfg.QueueBatches),
		w:       bufio.NewWriterSize(w, 256<<10),
		logged:  reg.Counter("kubezonnet_server_flow_log_events_total", "Flow log events written."),
		dropped: reg.Counter("kubezonnet_server_flow_log_dropped_total",
			"Flow log events dropped because the writer fell behind (logging never blocks ingest)."),
		errors: reg.Counter("kubezonnet_server_flow_log_write_errors_total", "Failed writes of the flow log."),
		done:   make(chan struct{}),
	}
	l.pool.New = func() any { return &Batch{Events: make([]Event, 0, 1024)} }
	return l
}

// Enabled reports whether flows of class are logged. A nil logger logs
// nothing, so callers need no separate switch.
func (l *Logger) Enabled(class resolve.Class) bool {
	return l != nil && l.classes.Has(class)
}

// Any reports whether any class is logged.
func (l *Logger) Any() bool { return l != nil && l.classes != 0 }

// Buffer returns an empty batch to fill and pass to Send.
func (l *Logger) Buffer() *Batch { return l.pool.Get().(*Batch) }

// Send queues a batch without blocking; it owns the batch afterwards. When
// the queue is full the batch is dropped and its events counted.
func (l *Logger) Send(b *Batch) {
	if len(b.Events) == 0 {
		l.recycle(b)
		return
	}
	select {
	case l.ch <- b:
	default:
		l.dropped.Add(float64(len(b.Events)))
		l.recycle(b)
	}
}

func (l *Logger) recycle(b *Batch) {
	clear(b.Events) // drop endpoint pointers so the pool pins nothing
	b.Events = b.Events[:0]
	l.pool.Put(b)
}

// Run writes queued events until ctx ends, then writes what is still
// queued and flushes. It returns after the final flush.
func (l *Logger) Run(ctx context.Context) {
	defer close(l.done)
	for {
		select {
		case b := <-l.ch:
			l.write(b)
			// Flush when the queue runs dry, so a quiet server's log is
			// current without a syscall per batch under load.
			if len(l.ch) == 0 {
				l.flush()
			}
		case <-ctx.Done():
			for {
				select {
				case b := <-l.ch:
					l.write(b)
				default:
					l.flush()
					return
				}
			}
		}
	}
}

// Done is closed when Run has returned.
func (l *Logger) Done() <-chan struct{} { return l.done }

func (l *Logger) write(b *Batch) {
	for i := range b.Events {
		l.buf = AppendEvent(l.buf[:0], &b.Events[i])
		if _, err := l.w.Write(l.buf); err != nil {
			l.errors.Inc()
		}
	}
	l.logged.Add(float64(len(b.Events)))
	l.recycle(b)
}

func (l *Logger) flush() {
	if err := l.w.Flush(); err != nil {
		l.errors.Inc()
	}
}

// AppendEvent appends the JSON line of e (with its newline) to b: the
// object log/slog's JSON handler writes for the event.
//
// Kept over a slog.Handler for the flow-log budget: BenchmarkAppendEvent's
// slog baseline against IngestPathFlowLog (BENCHMARKS.md, "Server").
func AppendEvent(b []byte, e *Event) []byte {
	b = append(b, `{"time":"`...)
	b = e.Time.UTC().AppendFormat(b, time.RFC3339Nano) // UTC: comparable across nodes
	b = append(b, `","level":"INFO","msg":"flow","node":`...)
	b = appendString(b, e.Node)
	b = appendEndpoint(b, "src", e.Src, e.Key.Src)
	b = appendEndpoint(b, "dst", e.Dst, e.Key.Dst)
	b = append(b, `,"port":`...)
	b = strconv.AppendUint(b, uint64(e.Port), 10)
	b = append(b, `,"proto":"`...)
	b = append(b, flow.ProtoName(e.Proto)...)
	b = append(b, `","bytes":`...)
	b = strconv.AppendUint(b, e.Bytes, 10)
	b = append(b, `,"packets":`...)
	b = strconv.AppendUint(b, e.Packets, 10)
	b = append(b, `,"class":`...)
	b = appendString(b, e.Class.String())
	if e.Service != nil {
		b = append(b, `,"service_namespace":`...)
		b = appendString(b, e.Service.Namespace)
		b = append(b, `,"service":`...)
		b = appendString(b, e.Service.Name)
		b = append(b, `,"avoidable":`...)
		b = strconv.AppendBool(b, e.Avoidable)
	}
	return append(b, "}\n"...)
}

func appendEndpoint(b []byte, side string, ep *resolve.Endpoint, ip netip.Addr) []byte {
	if ep == nil {
		ep = &resolve.Endpoint{}
	}
	for _, kv := range [...]struct{ key, value string }{
		{"_namespace", ep.Namespace}, {"_pod", ep.Pod}, {"_workload", ep.Workload},
		{"_node", ep.Node}, {"_zone", ep.Zone},
	} {
		b = append(b, `,"`...)
		b = append(b, side...)
		b = append(b, kv.key...)
		b = append(b, `":`...)
		b = appendString(b, kv.value)
	}
	b = append(b, `,"`...)
	b = append(b, side...)
	b = append(b, `_ip":"`...)
	b = ip.AppendTo(b)
	return append(b, '"')
}

// appendString appends s as a JSON string. Kubernetes names need no
// escaping, so the common case is a plain copy; anything else is escaped
// as encoding/json would (control characters, quotes, backslashes,
// invalid UTF-8 replaced).
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		b = append(b, s[start:i]...)
		if c < utf8.RuneSelf {
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\t':
				b = append(b, '\\', 't')
			case '\r':
				b = append(b, '\\', 'r')
			default:
				b = append(b, `\u00`...)
				b = append(b, "0123456789abcdef"[c>>4], "0123456789abcdef"[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, `\ufffd`...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
