package resolve

import "slices"

// Kind says what sort of thing an address belongs to. Its String form is the
// value of the kind labels (src_kind, dst_kind) of the series contract.
type Kind uint8

// The endpoint kinds. KindUnknown is the zero value so that a forgotten
// assignment shows up as "unknown" rather than as a fabricated pod.
const (
	KindUnknown Kind = iota
	KindPod
	KindNode
	KindStatic
	KindExternal
)

var kindNames = [...]string{
	KindUnknown:  "unknown",
	KindPod:      "pod",
	KindNode:     "node",
	KindStatic:   "static",
	KindExternal: "external",
}

// String returns the label value of the kind ("pod", "node", ...).
func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "unknown"
}

// Workload kinds of non-pod endpoints and the fixed label values of the
// contract; pods use their owner's kind (Deployment, StatefulSet, ...).
const (
	WorkloadKindPod      = "Pod"
	WorkloadKindNode     = "Node"
	WorkloadKindStatic   = "Static"
	WorkloadKindExternal = "External"
	WorkloadKindUnknown  = "Unknown"

	// ValueExternal is the workload, zone and region of the public internet.
	ValueExternal = "external"
	// ValueUnknown is the workload, zone and region of what cannot be resolved.
	ValueUnknown = "unknown"
)

// Reasons an endpoint is unknown; each is a value of the reason label of
// kubezonnet_server_unresolved_total, so the set is small and fixed.
const (
	// ReasonNoPod: a private (non-public) address no pod, node or static
	// endpoint claims, and no recently released pod held at that time.
	ReasonNoPod = "no_pod"
	// ReasonNoZone: the pod's (or host address's) node has no zone label.
	ReasonNoZone = "no_zone"
	// ReasonNoNode: the pod runs on a node the informer does not know (yet).
	ReasonNoNode = "no_node"
	// ReasonNotSynced: the address is unclaimed but the informers have not
	// finished their initial list, so the answer may change.
	ReasonNotSynced = "not_synced"
	// ReasonInvalidAddress: the zero netip.Addr or the unspecified address.
	ReasonInvalidAddress = "invalid_address"
)

// Endpoint is what an address resolved to. Values handed out by the Resolver
// are shared and immutable: callers must never modify them, and may keep the
// pointer (e.g. as part of a map key) for as long as they like.
type Endpoint struct {
	Kind Kind
	// Namespace and Pod name the pod (kind pod; also kept on unknown
	// endpoints whose pod is known but whose node has no zone).
	Namespace, Pod string
	// Workload and WorkloadKind name the owner (see the contract).
	Workload, WorkloadKind string
	// Node is the node the address belongs to (pods and host addresses).
	Node string
	// Zone and Region come from the node labels, the static file, or are
	// "external"/"unknown".
	Zone, Region string
	// Reason says why the endpoint is unknown; empty otherwise.
	Reason string
	// Labels holds the values of Config.PodLabels for pods, in that order
	// ("" where the pod lacks the label); nil for other kinds.
	Labels []string
}

// Shared endpoints for the fixed cases; returned by pointer so the hot path
// never allocates.
var (
	epExternal = &Endpoint{Kind: KindExternal, Workload: ValueExternal, WorkloadKind: WorkloadKindExternal,
		Zone: ValueExternal, Region: ValueExternal}
	epNoPod          = unknownEndpoint(ReasonNoPod)
	epNotSynced      = unknownEndpoint(ReasonNotSynced)
	epInvalidAddress = unknownEndpoint(ReasonInvalidAddress)
)

// unknownEndpoint builds an unknown endpoint with the contract's fixed values.
func unknownEndpoint(reason string) *Endpoint {
	return &Endpoint{Kind: KindUnknown, Workload: ValueUnknown, WorkloadKind: WorkloadKindUnknown,
		Zone: ValueUnknown, Region: ValueUnknown, Reason: reason}
}

// knownZone reports whether a zone or region value names a real place.
func knownZone(z string) bool {
	return z != "" && z != ValueUnknown && z != ValueExternal
}

// podEndpoint builds the endpoint of a pod on the pod network. A pod whose
// node is not known, or has no zone, is unknown (its namespace, pod and node
// are kept so flow logs still say which pod it was).
func podEndpoint(st *podState, workload, workloadKind string) *Endpoint {
	n := st.node
	nodeName := ""
	if n != nil {
		nodeName = n.name
	}
	switch {
	case n == nil || !n.known:
		return podUnknown(st, nodeName, ReasonNoNode)
	case n.zone == "":
		return podUnknown(st, nodeName, ReasonNoZone)
	}
	return &Endpoint{Kind: KindPod, Namespace: st.namespace, Pod: st.name, Workload: workload,
		WorkloadKind: workloadKind, Node: n.name, Zone: n.zone, Region: n.region, Labels: st.labels}
}

func podUnknown(st *podState, node, reason string) *Endpoint {
	ep := unknownEndpoint(reason)
	ep.Namespace, ep.Pod, ep.Node, ep.Labels = st.namespace, st.name, node, st.labels
	return ep
}

// nodeEndpoint builds the endpoint of a node's own (host) addresses.
func nodeEndpoint(n *nodeState) *Endpoint {
	var ep *Endpoint
	switch {
	case !n.known:
		ep = unknownEndpoint(ReasonNoNode)
	case n.zone == "":
		ep = unknownEndpoint(ReasonNoZone)
	default:
		return &Endpoint{Kind: KindNode, Workload: n.name, WorkloadKind: WorkloadKindNode,
			Node: n.name, Zone: n.zone, Region: n.region}
	}
	ep.Node = n.name
	return ep
}

// sameOrNew keeps the old pointer when nothing changed, so consumers that
// key on the pointer see no churn from no-op informer updates.
func sameOrNew(old, ep *Endpoint) *Endpoint {
	if old != nil && old.Kind == ep.Kind && old.Namespace == ep.Namespace && old.Pod == ep.Pod &&
		old.Workload == ep.Workload && old.WorkloadKind == ep.WorkloadKind && old.Node == ep.Node &&
		old.Zone == ep.Zone && old.Region == ep.Region && old.Reason == ep.Reason &&
		slices.Equal(old.Labels, ep.Labels) {
		return old
	}
	return ep
}
