package agent

import (
	"sync/atomic"
	"time"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
)

// Reasons for dropped bytes that the agent itself adds to the kernel's.
var agentReasons = []string{"buffer_full", "rejected"}

// agentMetrics are the agent's self-metrics. They are served on /metrics
// and travel in every batch, so push-only clusters see them too.
type agentMetrics struct {
	flows, bytes, packets           *metrics.Counter
	notLocalBytes, notLocalPackets  *metrics.Counter
	droppedBytes, droppedPackets    map[string]*metrics.Counter
	attempts, failures, retries     *metrics.Counter
	batches, rejected, prefixErrors *metrics.Counter
	drainTime, drainWait, stuckCPUs *metrics.Counter
	lastSend, tableSlots            *metrics.Gauge
	spilled, logged                 *metrics.Counter
	releases, releasesUnordered     *metrics.Counter
	routeResyncs                    *metrics.Counter
	notices, noticeFailures         *metrics.Counter
	buffered                        atomic.Int64
}

func newAgentMetrics(r *metrics.Registry) *agentMetrics {
	m := &agentMetrics{
		flows:           r.Counter("kubezonnet_agent_flows_total", "Flow records drained from the kernel."),
		bytes:           r.Counter("kubezonnet_agent_bytes_total", "Bytes counted in flows (L3, every segment's headers included)."),
		packets:         r.Counter("kubezonnet_agent_packets_total", "Packets counted in flows (GSO segments counted one by one)."),
		notLocalBytes:   r.Counter("kubezonnet_agent_not_local_bytes_total", "Bytes seen from sources of other nodes, left to their agents (not a loss)."),
		notLocalPackets: r.Counter("kubezonnet_agent_not_local_packets_total", "Packets seen from sources of other nodes, left to their agents (not a loss)."),
		droppedBytes:    map[string]*metrics.Counter{},
		droppedPackets:  map[string]*metrics.Counter{},
		attempts:        r.Counter("kubezonnet_agent_send_attempts_total", "Batches handed to the sender (each retried until accepted or refused)."),
		failures:        r.Counter("kubezonnet_agent_send_failures_total", "Failed requests to the server (each retry that failed, and refusals)."),
		retries:         r.Counter("kubezonnet_agent_send_retries_total", "Requests repeated after a retryable failure."),
		batches:         r.Counter("kubezonnet_agent_batches_sent_total", "Batches acknowledged by the server."),
		rejected:        r.Counter("kubezonnet_agent_batches_rejected_total", "Batches the server refused for good (4xx); their counts are in dropped{reason=\"rejected\"}."),
		prefixErrors:    r.Counter("kubezonnet_agent_prefix_refresh_errors_total", "Failed refreshes of the local prefixes from the Node object."),
		lastSend:        r.Gauge("kubezonnet_agent_last_send_timestamp_seconds", "Unix time of the last batch acknowledged by the server."),
		drainTime:       r.Counter("kubezonnet_agent_drain_seconds_total", "Time spent draining the kernel's flow counts."),
		drainWait:       r.Counter("kubezonnet_agent_drain_wait_seconds_total", "Part of the drain time spent waiting for kernel programs still counting into the old generation (grows when they are preempted)."),
		tableSlots:      r.Gauge("kubezonnet_agent_flow_table_slots", "Kernel flow table slots in use per CPU in the generation counting now, sized at each drain from the flows per CPU of the latest intervals (at most what --flow-table-memory gives a CPU)."),
		spilled:         r.Counter("kubezonnet_agent_flow_table_spilled_flows_total", "Flows that neither the kernel flow table nor the kernel flow log had room for, counted in the slower hash map (--max-flows), once per CPU per flush interval."),
		logged:          r.Counter("kubezonnet_agent_flow_log_records_total", "Packets (a GSO super-packet is one) of flows the kernel flow table had no room for, read from the kernel flow log and added up in user space."),
		releases:        r.Counter("kubezonnet_agent_address_releases_total", "Pod addresses this node's pods released (host route or its link deleted, or the route moved to another link), each reported to the server in a batch of what was drained up to it."),
		releasesUnordered: r.Counter("kubezonnet_agent_address_releases_unordered_total",
			"Releases whose batch, still unsent when another release came, took flows of their address drained after them: those flows may be credited to the released pod. Normally zero; grows while the server does not acknowledge."),
		notices:        r.Counter("kubezonnet_agent_release_notices_total", "Release notices the server accepted: releases sent ahead of their batch while another batch was in flight."),
		noticeFailures: r.Counter("kubezonnet_agent_release_notice_failures_total", "Release notices that failed (not resent: their batch carries the releases)."),
		routeResyncs:   r.Counter("kubezonnet_agent_route_resyncs_total", "Times route notifications were lost (the netlink socket overflowed) and the host routes were listed again; releases in between are reported then."),
		stuckCPUs:      r.Counter("kubezonnet_agent_drain_stuck_cpus_total", "CPUs a drain stopped waiting for: their in-flight counter was still not zero when the drain's bounded wait ran out (one per CPU per drain). Counts such a CPU wrote late into the old generation may be lost; normally zero."),
	}
	reasons := agentReasons
	for i := range bpf.NumReasons {
		if bpf.Reason(i) != bpf.ReasonNotLocal {
			reasons = append(reasons, bpf.Reason(i).String())
		}
	}
	for _, reason := range reasons {
		l := metrics.Label{Name: "reason", Value: reason}
		m.droppedBytes[reason] = r.Counter("kubezonnet_agent_dropped_bytes_total", "Bytes that could not be counted in a flow, by reason (map_full: kernel flow map full).", l)
		m.droppedPackets[reason] = r.Counter("kubezonnet_agent_dropped_packets_total", "Packets that could not be counted in a flow, by reason.", l)
	}
	return m
}

// drained records one drain, which lasted took.
func (m *agentMetrics) drained(d *bpf.Drained, took time.Duration) {
	m.drainTime.Add(took.Seconds())
	m.drainWait.Add(d.Waited.Seconds())
	m.stuckCPUs.Add(float64(len(d.Stuck)))
	m.tableSlots.Set(float64(d.TableSlots))
	m.spilled.Add(float64(d.Spilled))
	m.logged.Add(float64(d.Logged))
	var sum flow.Counts
	for _, r := range d.Flows {
		sum.Add(r.Counts)
	}
	m.flows.Add(float64(len(d.Flows)))
	m.bytes.Add(float64(sum.Bytes))
	m.packets.Add(float64(sum.Packets))
	for i, c := range d.Uncounted {
		if c.IsZero() {
			continue
		}
		if bpf.Reason(i) == bpf.ReasonNotLocal {
			m.notLocalBytes.Add(float64(c.Bytes))
			m.notLocalPackets.Add(float64(c.Packets))
			continue
		}
		m.dropped(bpf.Reason(i).String(), c)
	}
}

func (m *agentMetrics) dropped(reason string, c flow.Counts) {
	m.droppedBytes[reason].Add(float64(c.Bytes))
	m.droppedPackets[reason].Add(float64(c.Packets))
}
