// Package wire is the contract between agent and server: how an agent's
// batch of flows travels as a Prometheus remote-write 1.0 request.
//
// # The request
//
// One request carries one batch. Its series, in this order:
//
//  1. The batch header, exactly once, first:
//     kubezonnet_agent_batch{incarnation="<hex>", node="<node name>", seq="<n>"}
//     with one sample: value = number of flows in the batch, timestamp = the
//     time the agent drained the kernel (ms), i.e. when the flows were seen.
//
//  2. Per flow, exactly one series:
//     kubezonnet_flow{dport|sport="<port>", dst="<ip>", orig_dst="<ip>:<port>", proto="<p>", src="<ip>"}
//     with exactly two samples, both without a timestamp (the header's
//     applies): the first sample's value is the bytes, the second's the
//     packets the flow sent since the previous batch of this incarnation,
//     each a non-negative integer. Bytes are L3 bytes as on the wire (see
//     the bpf package). dport means the service port is the destination
//     port (client to service), sport that it is the source port (service
//     answering); neither label is present for protocols without ports
//     (then the port is 0), and one of them always is for tcp, udp and
//     sctp. proto is tcp, udp, icmp, icmpv6, sctp or the protocol number.
//     orig_dst is optional: present only when the flow has an original
//     destination (flow.Key.OrigDst: the destination the client addressed
//     before destination NAT, a Service's virtual IP and port under
//     kube-proxy, while dst is the backend), in netip.AddrPort's text form:
//     "10.96.0.10:80", "[fd00:96::10]:80"; its port is 0 where the flow has
//     no ports. An absent orig_dst means none; a value that does not parse
//     as an address and port (or carries a zone) is a malformed request.
//     __name__ comes first and the labels are sorted by name (dport, dst,
//     orig_dst, proto, sport, src), as remote-write requires; a flow series
//     has no other label.
//
//     Two samples under one label set, rather than a bytes and a packets
//     series, halve the request and the work to encode and decode it: the
//     labels are most of a flow's bytes. Remote-write allows it (samples of
//     one series), and nothing but the kubezonnet server consumes these
//     series: Prometheus never stores them, so the two samples sharing a
//     timestamp is no concern. The contract is pre-1.0: the server accepts
//     only this form, not the former kubezonnet_flow_bytes and
//     kubezonnet_flow_packets pair, so agents and servers are upgraded
//     together.
//
//  3. The addresses the node's pods released, any number (a repeated one
//     says nothing more): kubezonnet_address_released{address="<ip>"}
//     with one sample, value 1, whose timestamp (ms) is when the agent saw
//     the release (the pod's host route going away), at or before the
//     header's. The agent drains when it sees a release, so the flows of
//     the address in this batch and in earlier ones are its former
//     holder's, and those in later batches of this node belong to a pod
//     that got the address after the release. The server uses it to keep
//     flows stamped after the release from the pod that held the address
//     before, while its informer has not shown the deletion yet (see
//     server/resolve, "Releases reported by the node"). An agent that
//     cannot see releases sends none. Every agent keeps each batch's time
//     later than the previous batch's: releases are ordered by it.
//
//  4. The agent's self-metrics, any number: kubezonnet_agent_<name>{node,
//     ...} with their cumulative value since the agent started, which the
//     server re-exports so that push-only clusters see them.
//
// Exemplars, histograms and metadata are not part of the contract: a
// request carrying any is refused as malformed. Unknown fields are
// skipped.
//
// # Release notices
//
// An agent whose batch is in flight (being sent, or resent after a
// refusal) when it sees a release cannot send the batch that carries it:
// batches go one at a time. It may send the release ahead, to POST
// /api/v1/releases, as a request of the same form with no flow: the header
// of the batch that will carry the release (its seq and time) and the
// released addresses. The server records the releases and applies nothing
// else: it de-duplicates nothing, and a notice counts for no batch. The
// batch still carries the releases; the same release reported twice
// counts once. A notice is best effort: one that fails is not resent.
//
// # Exactly once
//
// The values are deltas, so a batch must be applied exactly once. An agent
// incarnation (a random id chosen at start) numbers its batches 1, 2, 3...
// and sends them one at a time: batch n+1 is only built after batch n was
// acknowledged with a 2xx, and a failed batch is resent byte for byte with
// the same seq (flows drained meanwhile wait in a separate buffer). The
// server remembers, per node and incarnation, the highest seq it applied
// and acknowledges without applying any batch at or below it. A retried or
// duplicated request is therefore harmless, and a restarted agent (new
// incarnation) starts from 0 without being confused with the old one.
package wire

import (
	"net/netip"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
)

// Series and label names of the contract.
const (
	MetricBatch = "kubezonnet_agent_batch"
	// MetricFlow is the one series per flow; its samples are the bytes
	// then the packets.
	MetricFlow = "kubezonnet_flow"
	// AgentMetricPrefix starts the name of every agent self-metric.
	AgentMetricPrefix = "kubezonnet_agent_"

	LabelName        = "__name__"
	LabelIncarnation = "incarnation"
	LabelNode        = "node"
	LabelSeq         = "seq"
	LabelSrc         = "src"
	LabelDst         = "dst"
	LabelProto       = "proto"
	LabelDport       = "dport"
	LabelSport       = "sport"
	// LabelOrigDst is the flow's original destination (flow.Key.OrigDst),
	// present only when it has one.
	LabelOrigDst = "orig_dst"

	// ReleasesPath is where an agent posts release notices (see
	// "Release notices"), beside the server's /api/v1/write.
	ReleasesPath = "/api/v1/releases"
	// MetricReleased is one address released by a pod of the node
	// (Batch.Released), in LabelAddress.
	MetricReleased = "kubezonnet_address_released"
	LabelAddress   = "address"
)

// Label is a name and value pair of a self-metric.
type Label struct {
	Name, Value string
}

// Metric is one agent self-metric sample. Labels exclude __name__ and node,
// and are sorted by name.
type Metric struct {
	Name   string
	Labels []Label
	Value  float64
}

// Batch is what an agent sends in one request.
type Batch struct {
	Node        string
	Incarnation string
	Seq         uint64
	// Time is when the flows were drained from the kernel. It increases
	// from batch to batch of an incarnation, at millisecond precision.
	Time  time.Time
	Flows []flow.Record
	// Released are the addresses the node's pods gave back, at or
	// before Time: flows of them in later batches belong to a later
	// holder.
	Released []Release
	Metrics  []Metric
}

// Release is an address a pod of the node gave back, and when the agent
// saw it (at millisecond precision on the wire).
type Release struct {
	Addr netip.Addr
	Time time.Time
}
