//go:build linux

package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/command"
	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/netns"
	"github.com/kubezonnet/kubezonnet/internal/packet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

func testConfig(serverURL string) Config {
	return Config{
		ServerURL: serverURL, NodeName: "node-a",
		FlushInterval: 100 * time.Millisecond, AttachMode: AttachNetfilter,
		NetfilterPriority: bpf.DefaultNetfilterPriority, MaxFlows: 4096, FlowTableMemory: 1, MaxBufferedFlows: 4096,
		LocalPrefixes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")},
		PrefixRefresh: time.Minute, Log: command.Log{Level: "debug", Format: "json"},
		ShutdownTimeout: 5 * time.Second, RetryMin: 20 * time.Millisecond, RetryMax: 200 * time.Millisecond,
	}
}

// runningAgent is an agent running in the test process around a real
// datapath.
type runningAgent struct {
	*Agent
	dp   *bpf.Datapath
	inj  *injector
	logs *testutil.SyncBuffer
	stop func() error
}

// startAgent loads a real datapath, attached in an injector's namespace
// (see injector), and runs an agent.
func startAgent(t *testing.T, cfg Config) *runningAgent {
	t.Helper()
	return startAgentWith(t, cfg, nil)
}

// startAgentWith is startAgent that runs setup (if not nil) with the
// injector's namespace name before the agent starts.
func startAgentWith(t *testing.T, cfg Config, setup func(ns string)) *runningAgent {
	t.Helper()
	testutil.RequireRoot(t)
	dp, err := bpf.Load(cfg.datapathConfig())
	if err != nil {
		t.Fatal(err)
	}
	inj := newInjector(t, dp)
	if cfg.ReportReleases {
		// The pods' host routes are those of the injector's namespace.
		cfg.NetnsPath = netns.Path(inj.ns)
	}
	if setup != nil {
		setup(inj.ns)
	}
	logs := &testutil.SyncBuffer{}
	a, err := New(cfg, dp, nil, slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		dp.Close()
		t.Fatal(err)
	}
	// Set the prefixes before Run, as the command does before attaching,
	// so that injected packets count from the first one: nothing to wait
	// for once Run starts.
	if err := a.refreshPrefixes(context.Background()); err != nil {
		dp.Close()
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			runErr = <-done
		})
		return runErr
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("agent logs:\n%s", logs.String())
		}
	})
	return &runningAgent{Agent: a, dp: dp, inj: inj, logs: logs, stop: stop}
}

// waitFor polls cond for up to 20 s. It is a wait for an event, not a
// timing assertion.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond) // the poll interval
	}
}

// inject runs n packets of size bytes from src to dst through the kernel
// program and returns what they add up to.
func (r *runningAgent) inject(t *testing.T, src, dst string, port uint16, size, n int) flow.Counts {
	t.Helper()
	pkt := packet.IPv4(t, 6, netip.AddrPortFrom(netip.MustParseAddr(src), 40000), netip.AddrPortFrom(netip.MustParseAddr(dst), port), size, 0)
	for range n {
		r.inj.send(t, pkt)
	}
	return flow.Counts{Bytes: uint64(size * n), Packets: uint64(n)}
}

func metricValue(t *testing.T, a *Agent, name, reason string) float64 {
	t.Helper()
	var v float64
	found := false
	a.reg.Each(func(n string, labels []metrics.Label, value float64) {
		if n != name {
			return
		}
		for _, l := range labels {
			if l.Name == "reason" && l.Value != reason {
				return
			}
		}
		v, found = value, true
	})
	if !found {
		t.Fatalf("metric %s{reason=%q} not registered", name, reason)
	}
	return v
}

// TestRetriesLoseNothingAndDoubleNothing: the receiver answers 500 and 503
// to the first requests, and once applies a batch but answers 500 (the
// acknowledgement is lost), then 200. Every byte arrives exactly once.
func TestRetriesLoseNothingAndDoubleNothing(t *testing.T) {
	rcv := newReceiver(t, func(n int) (int, bool) {
		switch {
		case n <= 2:
			return http.StatusInternalServerError, false
		case n == 3:
			return http.StatusServiceUnavailable, false
		case n == 4:
			return http.StatusInternalServerError, true // applied, ack lost
		}
		return http.StatusOK, true
	})
	ra := startAgent(t, testConfig(rcv.srv.URL))
	var sent flow.Counts
	for i := range 20 {
		sent.Add(ra.inject(t, "10.0.0.1", "10.1.0.1", 5432, 1000+i, 50))
		sent.Add(ra.inject(t, "10.0.0.2", "10.1.0.2", 80, 60, 10))
		// Pacing, not a wait: spreads the traffic over a few flush
		// intervals so that it travels in several batches through the
		// failures. No assertion depends on how many.
		time.Sleep(15 * time.Millisecond)
	}
	if err := ra.stop(); err != nil {
		t.Fatalf("agent shutdown: %v", err)
	}
	total, _, requests := rcv.snapshot()
	if total != sent {
		t.Errorf("receiver applied %+v, sent %+v", total, sent)
	}
	if rcv.resent < 4 {
		t.Errorf("only %d resends of the same batch over %d requests; the failures were not retried", rcv.resent, requests)
	}
	if r := metricValue(t, ra.Agent, "kubezonnet_agent_send_retries_total", ""); r < 4 {
		t.Errorf("send_retries_total = %v, want >= 4", r)
	}
	drained := metricValue(t, ra.Agent, "kubezonnet_agent_drain_seconds_total", "")
	waited := metricValue(t, ra.Agent, "kubezonnet_agent_drain_wait_seconds_total", "")
	if drained <= 0 || waited < 0 || waited > drained {
		t.Errorf("drain_seconds_total = %v, drain_wait_seconds_total = %v: want drain time > 0 and the wait a part of it", drained, waited)
	}
}

// TestRejectedBatchIsNotRetried: a 400 is final: logged, counted, and the
// agent moves on to the next batch instead of retrying forever.
func TestRejectedBatchIsNotRetried(t *testing.T) {
	var mu sync.Mutex
	reject := true
	rcv := newReceiver(t, func(n int) (int, bool) {
		mu.Lock()
		defer mu.Unlock()
		if reject {
			reject = false
			return http.StatusBadRequest, false
		}
		return http.StatusNoContent, true
	})
	ra := startAgent(t, testConfig(rcv.srv.URL))
	// The very first batch may be empty; make the refused one carry bytes
	// by injecting before the first flush fires.
	lost := ra.inject(t, "10.0.0.1", "10.1.0.1", 443, 1500, 10)
	waitFor(t, "the refusal", func() bool { return metricValue(t, ra.Agent, "kubezonnet_agent_batches_rejected_total", "") == 1 })
	later := ra.inject(t, "10.0.0.1", "10.1.0.1", 443, 700, 3)
	if err := ra.stop(); err != nil {
		t.Fatal(err)
	}
	total, _, _ := rcv.snapshot()
	rejected := flow.Counts{
		Bytes:   uint64(metricValue(t, ra.Agent, "kubezonnet_agent_dropped_bytes_total", "rejected")),
		Packets: uint64(metricValue(t, ra.Agent, "kubezonnet_agent_dropped_packets_total", "rejected")),
	}
	var all flow.Counts
	all.Add(lost)
	all.Add(later)
	var accounted flow.Counts
	accounted.Add(total)
	accounted.Add(rejected)
	if accounted != all {
		t.Errorf("applied %+v + counted as rejected %+v != sent %+v", total, rejected, all)
	}
	if rejected.IsZero() {
		t.Error("the refused batch carried no bytes; the test proves nothing")
	}
	if rcv.resent != 0 {
		t.Errorf("the refused batch was resent %d times", rcv.resent)
	}
	if !strings.Contains(ra.logs.String(), "test receiver refuses this request") {
		t.Error("the log does not carry the server's refusal message")
	}
}

// TestOutageKeepsCountsWithinBound: the server is unreachable for many
// flush intervals while flows keep coming. Known flows merge (no loss), new
// flows beyond --max-buffered-flows are counted as dropped, memory stays at
// the bound, and everything kept arrives once the server is back.
func TestOutageKeepsCountsWithinBound(t *testing.T) {
	var mu sync.Mutex
	down := true
	rcv := newReceiver(t, func(n int) (int, bool) {
		mu.Lock()
		defer mu.Unlock()
		if down {
			return http.StatusServiceUnavailable, false
		}
		return http.StatusNoContent, true
	})
	cfg := testConfig(rcv.srv.URL)
	cfg.MaxBufferedFlows = 40
	ra := startAgent(t, cfg)
	var sent flow.Counts
	maxBuffered := 0.0
	for round := range 15 {
		for i := range 6 {
			dst := netip.AddrFrom4([4]byte{10, 2, byte(round), byte(i)}).String()
			sent.Add(ra.inject(t, "10.0.0.1", dst, 443, 200+i, 5))
		}
		// Every packet of the round drained into the buffer (it only
		// holds local flows; the kernel drops none), so each
		// round meets a buffer that the outage keeps filling.
		waitFor(t, "the round's drain", func() bool {
			return metricValue(t, ra.Agent, "kubezonnet_agent_packets_total", "") >= float64(sent.Packets)
		})
		maxBuffered = max(maxBuffered, metricValue(t, ra.Agent, "kubezonnet_agent_buffered_flows", ""))
	}
	if maxBuffered > float64(2*cfg.MaxBufferedFlows) {
		t.Errorf("buffered flows reached %v, bound is %d buffered + one batch of %d", maxBuffered, cfg.MaxBufferedFlows, cfg.MaxBufferedFlows)
	}
	mu.Lock()
	down = false
	mu.Unlock()
	if err := ra.stop(); err != nil {
		t.Fatal(err)
	}
	total, _, _ := rcv.snapshot()
	dropped := flow.Counts{
		Bytes:   uint64(metricValue(t, ra.Agent, "kubezonnet_agent_dropped_bytes_total", "buffer_full")),
		Packets: uint64(metricValue(t, ra.Agent, "kubezonnet_agent_dropped_packets_total", "buffer_full")),
	}
	if dropped.IsZero() {
		t.Error("nothing dropped although 90 flows met a bound of 40: the bound is not enforced")
	}
	var accounted flow.Counts
	accounted.Add(total)
	accounted.Add(dropped)
	if accounted != sent {
		t.Errorf("applied %+v + dropped %+v != sent %+v", total, dropped, sent)
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// stuckDatapath is a datapath whose every drain ran out of its bounded wait
// for one CPU (bpf.Drained.Stuck), which a real kernel does not do on
// demand; the bpf package tests the wait itself.
type stuckDatapath struct{}

func (stuckDatapath) Drain(dst *bpf.Drained) error {
	*dst = bpf.Drained{Flows: dst.Flows[:0], Waited: time.Second, Stuck: append(dst.Stuck[:0], 3)}
	return nil
}
func (stuckDatapath) SetLocalPrefixes([]netip.Prefix) error { return nil }
func (stuckDatapath) Close() error                          { return nil }

// TestDrainReportsStuckCPUs: a drain that went on without a CPU is counted
// in a self-metric and logged with the CPU, once per drain.
func TestDrainReportsStuckCPUs(t *testing.T) {
	logs := &testutil.SyncBuffer{}
	a, err := New(testConfig("http://127.0.0.1:9"), stuckDatapath{}, nil, slog.New(slog.NewJSONHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := a.drain(); err != nil {
			t.Fatal(err)
		}
	}
	if v := metricValue(t, a, "kubezonnet_agent_drain_stuck_cpus_total", ""); v != 2 {
		t.Errorf("drain_stuck_cpus_total = %v, want 2 (one CPU in each of 2 drains)", v)
	}
	var warnings int
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var rec struct{ Level, Msg, Cpus string }
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if rec.Level == "WARN" && strings.Contains(rec.Msg, "CPUs") && rec.Cpus == "[3]" {
			warnings++
		}
	}
	if warnings != 2 {
		t.Errorf("%d warnings naming CPU 3, want 2; logs:\n%s", warnings, logs.String())
	}
}

// TestFlowLogAtItsBound: more new flows on one CPU than the flow table
// has room for, the flow log's ring holds and --max-flows lets the log's
// sum and the hash map take. Every packet is delivered or counted as
// dropped (map_full), the agent reports the slots in use, the packets
// logged and the flows that spilled to the hash map, and warns once,
// naming the flag to raise.
func TestFlowLogAtItsBound(t *testing.T) {
	rcv := newReceiver(t, func(int) (int, bool) { return http.StatusOK, true })
	cfg := testConfig(rcv.srv.URL)
	cfg.FlowTableMemory = 1
	cfg.MaxFlows = 1024
	cfg.MaxBufferedFlows = 16384
	cfg.FlushInterval = time.Hour // one drain, at shutdown
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	slots, records, err := bpf.TableGeometry(1<<20, ncpu)
	if err != nil {
		t.Skipf("1 MiB of flow table on %d CPUs: %v", ncpu, err)
	}
	ra := startAgent(t, cfg)
	// Whether the log's reader ran while they were sent or not, the
	// table's room, the ring and the log's sum leave at least 2 x
	// MaxFlows + 1000 flows to the hash map, which holds MaxFlows.
	room := slots / 2 // the table starts at its region's size
	flows := room + records + 2*cfg.MaxFlows + 1000
	var sent flow.Counts
	testutil.OnCPU(t, 0, func() {
		for i := range flows {
			sent.Add(ra.inject(t, "10.0.0.1", fmt.Sprintf("10.1.%d.%d", i>>8, i&0xff), 443, 100, 1))
		}
	})
	if err := ra.stop(); err != nil {
		t.Fatal(err)
	}
	total, _, _ := rcv.snapshot()
	dropped := flow.Counts{
		Bytes:   uint64(metricValue(t, ra.Agent, "kubezonnet_agent_dropped_bytes_total", "map_full")),
		Packets: uint64(metricValue(t, ra.Agent, "kubezonnet_agent_dropped_packets_total", "map_full")),
	}
	if dropped.Packets < 1000 {
		t.Errorf("%d packets dropped as map_full, want at least 1000", dropped.Packets)
	}
	if got := (flow.Counts{Bytes: total.Bytes + dropped.Bytes, Packets: total.Packets + dropped.Packets}); got != sent {
		t.Errorf("receiver applied %+v and map_full %+v, sum %+v; sent %+v", total, dropped, got, sent)
	}
	if v := metricValue(t, ra.Agent, "kubezonnet_agent_flow_table_slots", ""); v != float64(slots) {
		t.Errorf("flow_table_slots = %v, want %d", v, slots)
	}
	if v := metricValue(t, ra.Agent, "kubezonnet_agent_flow_log_records_total", ""); v < float64(records) {
		t.Errorf("flow_log_records_total = %v, want at least the ring's %d", v, records)
	}
	if v, want := metricValue(t, ra.Agent, "kubezonnet_agent_flow_table_spilled_flows_total", ""), flows-room-records-cfg.MaxFlows; v < float64(want) {
		t.Errorf("flow_table_spilled_flows_total = %v, want at least %d", v, want)
	}
	if n := strings.Count(ra.logs.String(), "raise --flow-table-memory"); n != 1 {
		t.Errorf("%d warnings naming --flow-table-memory, want 1:\n%s", n, ra.logs.String())
	}
}
