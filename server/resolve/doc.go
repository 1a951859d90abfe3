// Package resolve turns the addresses in flows into endpoints: the pod,
// node, static endpoint or internet on each side, with the workload, zone
// and region that the server's series are labelled with.
//
// # Sources
//
// Client-go shared informers watch Pods and Nodes; their transform functions
// strip each object to what resolution needs (pods: name, namespace, UID,
// node, addresses, host-network flag, controller reference, phase, deletion
// time and the labels in Config.PodLabels; nodes: name, zone/region labels,
// InternalIP/ExternalIP addresses). Workloads are named through the metadata
// API (k8s.io/client-go/metadata): ReplicaSets give their Deployment and Jobs
// their CronJob. When Config.Metadata is nil, or listing ReplicaSets or Jobs
// is forbidden, a ReplicaSet named "<name>-<pod-template-hash>" is taken to
// belong to Deployment "<name>" and Jobs stay Jobs. RBAC needed: list and
// watch on pods and nodes; list and watch on replicasets.apps and jobs.batch
// for exact owner names.
//
// Until the informers have synced, SyncError (the server's /readyz) and a
// warning every DefaultSyncReportInterval give the API server's last
// failed list or watch: what the informers report, and what client-go
// retries without telling them, seen by the client's transport
// (Failures.Transport).
//
// # Resolution order
//
//  1. An address held now by a pod on the pod network: that pod, unless the
//     flow was observed before the pod got it (see below).
//  2. A node's InternalIP/ExternalIP or a host-network pod's address: the
//     node (kind "node"). Host addresses are not remembered after release.
//  3. A pod that released the address recently (the released-IP LRU).
//  4. A static endpoint from the CIDR file, longest prefix first.
//  5. A public address: "external". Anything else: "unknown", reason
//     "no_pod" ("not_synced" before the informers have synced,
//     "invalid_address" for the zero or unspecified address).
//
// A pod or host address whose node is not known is unknown with reason
// "no_node", and one whose node has no topology.kubernetes.io/zone label is
// unknown with reason "no_zone"; both keep namespace, pod and node so flow
// logs still name them. Endpoints are rebuilt when their pod, node or owner
// changes, so a zone label added later applies to the next lookup.
//
// # Time
//
// Resolve takes the time the flow was observed. The index records, for each
// address, the time its informer handler saw the address assigned (the
// "since" time; pods present at start-up count as holding their addresses
// since forever) and, in a golang-lru LRU of --released-ip-cache-size
// addresses, up to four previous holders with the time they were seen to
// release it (pod deleted, terminal phase, or address taken by another pod).
// A flow goes to the last holder that had the address at or before its
// time and still had it then. A flow after that holder's release goes to
// the next holder when the informer showed it at most
// --released-ip-reuse-window after the flow (the informer sees an
// assignment some time after it happened), else to the released holder
// if it released the address less than --released-ip-ttl before (a flow
// drained late), else to nobody. A flow older than every remembered holder
// goes to the oldest of them. While an address has no holder, within the
// reuse window of its release, Owner reports it awaiting one, and the
// server holds back the batches of its node that carry it until the new
// holder shows up or the window passed. Precision: both times are those at
// which this server's informer saw the change, so they lag the real change
// by the watch latency (typically well under a second), and agents stamp
// flows when they drain them (up to one flush interval after the
// packets). A reused address can therefore be misattributed for flows
// stamped between the real release and the informer seeing it; CNIs
// normally quarantine released addresses for longer.
//
// # Cost
//
// Resolve does not allocate: one read-locked map probe for pod and host
// addresses, plus an LRU probe only for addresses with released history, and
// one map probe per distinct static prefix length; BenchmarkResolve
// (BENCHMARKS.md) times it by kind of address. Memory grows with the pods
// indexed (index state plus each pod's transformed object in the informer
// cache) and with released addresses (a slot, an LRU entry and the pod's
// endpoint each), which --released-ip-cache-size bounds (64Ki addresses by
// default); BenchmarkIndexMemory measures both.
package resolve
