package scale

import (
	"context"
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
)

// Result is what a run measured.
type Result struct {
	// Options are the run's, defaults applied.
	Options Options
	// Setup is the time from the start to the first batch (control
	// plane, pods, receiver, server); Sending the time the agents
	// sent, up to the last acknowledgement.
	Setup, Sending time.Duration
	// Flows and Batches acknowledged; Retries of batches answered with a
	// retryable status or not at all.
	Flows, Batches, Retries int64
	// ReleaseBatches carried a release alone, sent as the node saw it;
	// Notices sent releases ahead of a batch in flight.
	ReleaseBatches, Notices int64
	// Churned is the number of pods replaced.
	Churned int
	// ServerCPU is the server's user plus system CPU time while the
	// agents sent.
	ServerCPU time.Duration
	// PeakRSS is the server's VmHWM at the end, in bytes.
	PeakRSS int64
	// ServerSeries is the server's kubezonnet_server_series gauge at the
	// end; CrossZonePairs the distinct cross-zone pod pairs of the ground
	// truth (the pairs that get pod-pair series by default).
	ServerSeries, CrossZonePairs int64
	// Folded pod pairs (beyond --max-pod-pairs) and unresolved flows, by
	// the server's counters.
	Folded, Unresolved int64
	// PushDuration is the longest kubezonnet_server_remote_write_push_duration_seconds.
	PushDuration time.Duration
	// SnapshotDuration is kubezonnet_server_remote_write_snapshot_duration_seconds:
	// the server's part of the last push.
	SnapshotDuration time.Duration
	// Held counts batches answered 503 because a source address awaited
	// its new pod (reason awaiting_pod).
	Held int64
	// SentBytes and SentPackets were acknowledged; ReceivedBytes and
	// ReceivedPackets are the sums of the zone-pair series in the receiver.
	SentBytes, SentPackets         uint64
	ReceivedBytes, ReceivedPackets float64
	// ZonePairs compared, and the differences found ("a->b: bytes sent X,
	// stored Y").
	ZonePairs          int
	ZonePairMismatches []string
	// MisattributedSeries are pod-pair series in the receiver naming a
	// pod deleted or created during the run with more bytes than were
	// sent while it held its address; MisattributedBytes the sum of the
	// excess.
	MisattributedSeries int
	MisattributedBytes  float64
	// MisattributedSources are the replaced pods and successors credited
	// more bytes as the source than they sent (by the sum of their
	// cross-zone pairs), with the excess in MisattributedSourceBytes:
	// flows reported by the node holding the address, whose agent reports
	// the release (wire.Batch.Released). MisattributedDestinations and
	// MisattributedDestinationBytes are the same as the destination:
	// flows another node reported, which sees the change only through the
	// server's informer.
	MisattributedSources, MisattributedDestinations         int
	MisattributedSourceBytes, MisattributedDestinationBytes float64
	// Traces explain each pod misattributed as the destination: when it
	// released its address, when the report of it was sent and
	// acknowledged, and when another node's first batch with flows to its
	// successor was.
	Traces []string
	// OrderTimeouts counts the batches whose wait for earlier requests'
	// releases ran out (kubezonnet_server_release_order_timeouts_total).
	OrderTimeouts int64
	// PodPairSeries is the number of pod pairs the receiver holds;
	// ChurnedPodSeries those naming a pod deleted or created during the
	// run.
	PodPairSeries, ChurnedPodSeries int

	latencies []time.Duration
}

// Exact reports whether the receiver holds exactly what was sent, in
// total and per zone pair.
func (r *Result) Exact() bool {
	return float64(r.SentBytes) == r.ReceivedBytes && float64(r.SentPackets) == r.ReceivedPackets && len(r.ZonePairMismatches) == 0
}

// Latency returns the q-quantile (0..1) of the POST round trips.
func (r *Result) Latency(q float64) time.Duration {
	if len(r.latencies) == 0 {
		return 0
	}
	return r.latencies[min(len(r.latencies)-1, int(math.Ceil(q*float64(len(r.latencies))))-1)]
}

// compare polls the receiver until its zone-pair totals equal what was
// sent or timeout passes, then compares per zone pair and per pod pair.
func (r *Result) compare(ctx context.Context, v receiver, w *world, truth map[pair]flow.Counts, zones map[zonePair]flow.Counts, timeout time.Duration) error {
	const bytesQ = "sum(last_over_time(kubezonnet_zone_pair_bytes_total[1h]))"
	const pktsQ = "sum(last_over_time(kubezonnet_zone_pair_packets_total[1h]))"
	deadline := time.Now().Add(timeout)
	for {
		if err := v.flush(ctx); err != nil {
			return err
		}
		var err error
		if r.ReceivedBytes, err = v.scalar(ctx, bytesQ); err != nil {
			return err
		}
		if r.ReceivedPackets, err = v.scalar(ctx, pktsQ); err != nil {
			return err
		}
		if (r.ReceivedBytes == float64(r.SentBytes) && r.ReceivedPackets == float64(r.SentPackets)) || time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}

	stored := map[zonePair][2]float64{}
	for i, q := range []string{
		"sum by (src_zone, dst_zone) (last_over_time(kubezonnet_zone_pair_bytes_total[1h]))",
		"sum by (src_zone, dst_zone) (last_over_time(kubezonnet_zone_pair_packets_total[1h]))",
	} {
		s, err := v.query(ctx, q)
		if err != nil {
			return err
		}
		for _, x := range s {
			zp := zonePair{x.Labels["src_zone"], x.Labels["dst_zone"]}
			e := stored[zp]
			e[i] = x.Value
			stored[zp] = e
		}
	}
	all := map[zonePair]bool{}
	for zp := range stored {
		all[zp] = true
	}
	for zp := range zones {
		all[zp] = true
	}
	r.ZonePairs = len(all)
	for zp := range all {
		sent, got := zones[zp], stored[zp]
		if float64(sent.Bytes) != got[0] || float64(sent.Packets) != got[1] {
			r.ZonePairMismatches = append(r.ZonePairMismatches, fmt.Sprintf("%s->%s: sent %d bytes %d packets, stored %.0f bytes %.0f packets",
				zp.src, zp.dst, sent.Bytes, sent.Packets, got[0], got[1]))
		}
	}
	sort.Strings(r.ZonePairMismatches)

	// A pod's name is never reused, so a series naming a replaced pod or
	// a successor with more than the truth holds was credited flows of
	// the other one.
	deleted := w.deletedPods()
	churned := func(pod string) bool { return deleted[pod] || w.genOfName(pod) > 0 }
	pairs, err := v.query(ctx, "sum by (src_pod, dst_pod) (last_over_time(kubezonnet_pod_pair_bytes_total[1h]))")
	if err != nil {
		return err
	}
	r.PodPairSeries = len(pairs)
	// Per side: each pod's bytes as the source and as the destination,
	// stored and sent, over the cross-zone pairs (the ones with pod-pair
	// series; a replacement keeps the node, so the zones). A pod credited
	// more than it sent as the source got flows its own node reported for
	// another holder of its address; as the destination, flows another
	// node reported (a pod pair on one node is never cross-zone).
	srcStored, dstStored := map[string]float64{}, map[string]float64{}
	for _, x := range pairs {
		p := pair{x.Labels["src_pod"], x.Labels["dst_pod"]}
		srcStored[p.src] += x.Value
		dstStored[p.dst] += x.Value
		if !churned(p.src) && !churned(p.dst) {
			continue
		}
		r.ChurnedPodSeries++
		if excess := x.Value - float64(truth[p].Bytes); excess > 0 {
			r.MisattributedSeries++
			r.MisattributedBytes += excess
		}
	}
	srcSent, dstSent := map[string]float64{}, map[string]float64{}
	for p, c := range truth {
		if w.zoneOfName(p.src) != w.zoneOfName(p.dst) {
			srcSent[p.src] += float64(c.Bytes)
			dstSent[p.dst] += float64(c.Bytes)
		}
	}
	for pod, v := range srcStored {
		if churned(pod) && v > srcSent[pod] {
			r.MisattributedSources++
			r.MisattributedSourceBytes += v - srcSent[pod]
		}
	}
	for pod, v := range dstStored {
		if churned(pod) && v > dstSent[pod] {
			r.MisattributedDestinations++
			r.MisattributedDestinationBytes += v - dstSent[pod]
			r.Traces = append(r.Traces, w.trace(pod, v-dstSent[pod]))
		}
	}
	sort.Strings(r.Traces)
	return nil
}

// WriteTable writes the result as one table, a row per measure.
func (r *Result) WriteTable(out io.Writer) error {
	o := r.Options
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	row := func(measure, value, note string) { fmt.Fprintf(tw, "%s\t%s\t%s\n", measure, value, note) }
	row("MEASURE", "VALUE", "NOTE")
	row("profile", fmt.Sprintf("%d nodes x %d pods, %d zones", o.Nodes, o.PodsPerNode, o.Zones),
		fmt.Sprintf("%d agents, %d flows/batch, %d peers/pod, %s sending, push every %s", o.Agents, o.FlowsPerBatch, o.PeersPerPod, o.Duration, o.PushInterval))
	offered := o.BatchesPerSecond * float64(o.FlowsPerBatch)
	achieved := float64(r.Flows) / r.Sending.Seconds()
	row("flows/s offered vs achieved", fmt.Sprintf("%.0f / %.0f", offered, achieved),
		fmt.Sprintf("%d flows in %d batches acknowledged, %d retries (flows merged by key count once)", r.Flows, r.Batches, r.Retries))
	cpuPerM := 0.0
	if r.Flows > 0 {
		cpuPerM = r.ServerCPU.Seconds() / (float64(r.Flows) / 1e6)
	}
	row("server CPU s per million flows", fmt.Sprintf("%.2f", cpuPerM),
		fmt.Sprintf("%.1f s CPU over %.1f s sending (utime+stime), pushes included", r.ServerCPU.Seconds(), r.Sending.Seconds()))
	perSeries, perPair := "-", "-"
	if r.ServerSeries > 0 {
		perSeries = fmt.Sprintf("%.0f", float64(r.PeakRSS)/float64(r.ServerSeries))
	}
	if r.CrossZonePairs > 0 {
		perPair = fmt.Sprintf("%.0f", float64(r.PeakRSS)/float64(r.CrossZonePairs))
	}
	row("server VmHWM", fmt.Sprintf("%.1f MiB", float64(r.PeakRSS)/(1<<20)), "peak resident set, whole process (informer cache of all pods included)")
	row("bytes per live series / pod pair", perSeries+" / "+perPair,
		fmt.Sprintf("VmHWM / kubezonnet_server_series (%d) / cross-zone pod pairs sent (%d); %d folded", r.ServerSeries, r.CrossZonePairs, r.Folded))
	row("ingest latency p50 / p99", fmt.Sprintf("%s / %s", r.Latency(0.5).Round(time.Microsecond), r.Latency(0.99).Round(time.Microsecond)),
		fmt.Sprintf("client-side POST round trip of flow batches, %d attempts (and %d batches reporting a release alone, %d release notices)", len(r.latencies), r.ReleaseBatches, r.Notices))
	row("push duration vs interval", fmt.Sprintf("%s / %s", r.PushDuration.Round(time.Millisecond), o.PushInterval),
		fmt.Sprintf("kubezonnet_server_remote_write_push_duration_seconds of the last push, taken after the sending ended; reading and encoding the snapshot took %s of it", r.SnapshotDuration.Round(time.Millisecond)))
	row("exactness bytes", exactness(float64(r.SentBytes), r.ReceivedBytes), fmt.Sprintf("sent %d, %s %.0f (sum of zone-pair series)", r.SentBytes, r.Options.Receiver, r.ReceivedBytes))
	row("exactness packets", exactness(float64(r.SentPackets), r.ReceivedPackets), fmt.Sprintf("sent %d, %s %.0f", r.SentPackets, r.Options.Receiver, r.ReceivedPackets))
	zoneNote := "every zone pair equal"
	if len(r.ZonePairMismatches) > 0 {
		zoneNote = strings.Join(r.ZonePairMismatches, "; ")
	}
	zoneValue := "EXACT"
	if len(r.ZonePairMismatches) > 0 {
		zoneValue = fmt.Sprintf("%d of %d differ", len(r.ZonePairMismatches), r.ZonePairs)
	}
	row("exactness per zone pair", zoneValue, zoneNote)
	ownNote := "replaced pods and successors credited more than they sent as the source: flows of the node holding the address, whose agent reports the release"
	if o.NoReleases {
		ownNote = "replaced pods and successors credited more than they sent as the source: flows of the node holding the address; agents report no release (-no-releases)"
	}
	row("misattributed as source (own node)", fmt.Sprintf("%d pods, %.0f bytes", r.MisattributedSources, r.MisattributedSourceBytes), ownNote)
	dstNote := fmt.Sprintf("the same as the destination: flows another node reported, ordered after the release's report when it reached the server first (%d batches gave up waiting for earlier requests)", r.OrderTimeouts)
	if o.NoReleases {
		dstNote = "the same as the destination: flows another node reported; agents report no release (-no-releases)"
	}
	row("misattributed as destination", fmt.Sprintf("%d pods, %.0f bytes", r.MisattributedDestinations, r.MisattributedDestinationBytes), dstNote)
	for _, t := range r.Traces {
		row("", "", t)
	}
	row("misattributed pod pairs", fmt.Sprintf("%d series, %.0f bytes", r.MisattributedSeries, r.MisattributedBytes),
		fmt.Sprintf("series naming a replaced pod or its successor with more than it sent (of %d naming one, %d in all); %d pods replaced (%.2f/s), %d unresolved flows, %d batches held for a new pod", r.ChurnedPodSeries, r.PodPairSeries, r.Churned, float64(r.Churned)/r.Sending.Seconds(), r.Unresolved, r.Held))
	row("setup / sending", fmt.Sprintf("%s / %s", r.Setup.Round(time.Second), r.Sending.Round(time.Second)), "control plane, pods, "+r.Options.Receiver+" and server; then traffic")
	return tw.Flush()
}

func exactness(sent, stored float64) string {
	if sent == stored {
		return "EXACT"
	}
	return fmt.Sprintf("%+.0f", stored-sent)
}
