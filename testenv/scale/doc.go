// Package scale measures the server under a simulated cluster: a real
// kube-apiserver and etcd (testenv.StartControlPlane) holding Nodes in three
// zones and pods whose addresses are patched into their status (no kubelet,
// no network namespaces), the real kubezonnet server resolving them through
// its informers, and a real VictoriaMetrics (or Prometheus, Options.Receiver)
// receiving its remote-write.
//
// The agents are simulated: one goroutine per node (up to Options.Agents)
// posts batches by the wire contract (internal/wire), one at a time, resending
// the same bytes on a retryable answer as the real agent does, at an offered
// rate. Pods churn meanwhile: a pod is deleted and another one, with a new
// name and UID, created with the same address, as a Deployment rollout with a
// sticky-IP CNI would. As the real agent does when a pod's host route goes,
// the agent of the pod's node reports the release at once, in a batch of
// its own, before the pod is deleted in the API server (Options.NoReleases
// turns that off, for the baseline).
//
// Run keeps its own ground truth, the bytes and packets acknowledged per
// (source pod, destination pod) pair, each flow attributed to the pods that
// held its addresses when the simulated agent generated it (the batch's
// time, taken before any replacement can follow), and compares it with
// what the receiver holds after the server's last push: totals and per
// zone pair must be exact; a replaced pod or its successor credited more
// bytes than it sent, as the source or as the destination, is
// misattributed, and each one as the destination is explained
// (Result.Traces): when its address was released, when the report was
// sent and acknowledged, and when another node's first batch to the
// successor was.
//
// The result is a table (Result.WriteTable) of throughput, server CPU and
// memory per flow and per pod pair, ingest latency, push duration, exactness
// and misattribution.
package scale
