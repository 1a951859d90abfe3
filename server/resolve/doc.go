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
// InternalIP/ExternalIP addresses; Services: name, type, cluster IPs,
// ports and protocols, traffic distribution; EndpointSlices: the
// kubernetes.io/service-name label and, per endpoint, the ready condition,
// zone and zone hints). Workloads are named through the metadata
// API (k8s.io/client-go/metadata): ReplicaSets give their Deployment and Jobs
// their CronJob. When Config.Metadata is nil, or listing ReplicaSets or Jobs
// is forbidden, a ReplicaSet named "<name>-<pod-template-hash>" is taken to
// belong to Deployment "<name>" and Jobs stay Jobs. RBAC needed: list and
// watch on pods, nodes and services, and on endpointslices.discovery.k8s.io;
// list and watch on replicasets.apps and jobs.batch for exact owner names.
// Without permission to list Services or EndpointSlices the resolver warns
// once and knows no Service rather than never syncing.
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
// # Releases reported by the node
//
// The node holding an address knows sooner: its agent sees the pod's host
// route go, drains at once, and reports the release in the batch of what
// it drained up to it (wire.Batch.Released; Released here). That node's
// flows of the address stamped after that batch then go only to a pod
// that got the address after the release, by the rules above; while the
// informer shows none, Lookup reports the address awaiting one, up to
// --released-ip-reuse-window after the flow, and the flow is then
// nobody's ("no_pod") rather than the released pod's. For other nodes'
// flows the release stands in for the deletion the informer may not show
// yet: stamped after it, they go to a later pod shown at most the window
// after the flow, await one up to the window after the release, and
// otherwise go to the released pod (their batch may carry packets sent
// before the release). The server records a release as soon as it has
// decoded the request reporting it, so that another node's flows decoded
// after that are ordered after it even while the report's own batch
// waits, and resolves a batch's flows once the requests that reached it
// before the batch was decoded have recorded theirs (for a bounded time).
// A release is recorded only for an address that a pod of the reporting
// node held at the release; the last one per address is kept, in an LRU
// as large as the released-IP one. The agent's times are its node's
// clock and the informer's the server's: they are compared, so clocks
// apart by more than a new pod takes to get an address (its sandbox, then
// its status) could keep a flow from the right pod.
//
// # Services
//
// Flows may carry the destination the client addressed before kube-proxy
// translated it: a Service's virtual IP and port. Resolver.Service maps
// such a destination (address, port and IP protocol) to the *Service,
// with its spec.trafficDistribution, through an index of every address of
// spec.clusterIPs with every port; headless and ExternalName Services
// have no virtual IP. Resolver.ReadyInZone then says whether, when the
// flow was observed, the Service had a ready endpoint in the client's zone
// and whether a ready endpoint was hinted for that zone: a Service asking
// for zone-local routing with a ready endpoint in the client's zone should
// not have sent its bytes across zones.
//
// Readiness comes from the Service's EndpointSlices (by their
// kubernetes.io/service-name label, all families and split slices
// together): per zone, the ready endpoints (ready condition true or
// unset) and the ready endpoints whose hints.forZones name the zone. Each
// change is recorded at the time the informer handler saw it, so a query
// about an earlier time gets the state of that time: the answer changes
// from the moment the informer saw an endpoint turn ready or not ready,
// with the same precision as pod addresses (see Time). Services of the
// initial list, and their slices, count as in that state since forever;
// a zone that gets endpoints later had none before. History is by
// namespace and name, so a Service deleted and created again continues
// its own.
//
// The same --released-ip-ttl bounds it all in time: a deleted Service,
// or a port or address it stopped serving, answers for flows up to that
// long after the informer saw the change (a later Service given the same
// address takes over from its own time, with --released-ip-reuse-window
// as for pods), and readiness older than that is merged into the oldest
// state kept, which then answers for all earlier times. A query about a
// time before every Service remembered for an address goes to the oldest
// of them. Memory is bounded by the Services, EndpointSlices and zones of
// the cluster, plus what churn leaves within the window, which constants
// bound: readiness changes per Service and zone (maxZoneTransitions),
// released virtual IPs (maxReleasedVIPs), deleted Services
// (maxDeletedServices), Services per virtual IP (maxHoldersPerVIP) and
// distinct zone names (maxZones). Queries never add state.
// BenchmarkServiceMemory measures the cost per Service.
//
// # Cost
//
// Resolve does not allocate: one read-locked map probe for pod and host
// addresses, plus an LRU probe only for addresses with released history, and
// one map probe per distinct static prefix length; BenchmarkResolve
// (BENCHMARKS.md) times it by kind of address. Service and ReadyInZone do
// not allocate either: one read-locked map probe for the virtual IP, and
// for readiness a probe of the (small) zone names and a scan of the
// Service's zones; BenchmarkServiceLookup times them. Memory grows with the pods
// indexed (index state plus each pod's transformed object in the informer
// cache) and with released addresses (a slot, an LRU entry and the pod's
// endpoint each), which --released-ip-cache-size bounds (64Ki addresses by
// default); BenchmarkIndexMemory measures both.
package resolve
