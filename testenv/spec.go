package testenv

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"strconv"

	corev1 "k8s.io/api/core/v1"

	"github.com/kubezonnet/kubezonnet/internal/testnet"
)

// Workload kinds, spelled as the workload_kind label value the server
// produces for them (shared contract 1).
const (
	KindDeployment  = "Deployment"  // Deployment -> ReplicaSet -> Pods
	KindStatefulSet = "StatefulSet" // StatefulSet -> Pods name-0, name-1, ...
	KindDaemonSet   = "DaemonSet"   // DaemonSet -> Pods
	KindCronJob     = "CronJob"     // CronJob -> Job -> Pods
	KindJob         = "Job"         // Job -> Pods
	KindPod         = "Pod"         // bare Pods, no owner
)

// Spec describes a cluster: nodes in zones and the workloads on them. The
// network side (internal/testnet) and the API side (Cluster) are both
// derived from it, so that the two match by construction.
type Spec struct {
	// Region is every node's topology.kubernetes.io/region.
	Region string
	// Nodes in order; node i gets testnet's addresses for index i.
	Nodes []NodeSpec
	// Workloads and where their pods run.
	Workloads []Workload
	// Offloads keeps TSO/GSO/GRO on in the network (see testnet.Spec).
	Offloads bool
	// StaticHosts are hosts outside the cluster (see testnet.Spec).
	StaticHosts []string
	// Services of the cluster, with kube-proxy's rules on a built network.
	Services []Service
}

// NodeSpec is one node.
type NodeSpec struct {
	Name string
	Zone string
}

// Workload is a set of pods under one owner.
type Workload struct {
	Namespace string
	Name      string
	// Kind is one of the Kind* constants.
	Kind string
	// Nodes places one pod on each listed node, in order (a node may be
	// listed twice).
	Nodes []string
	// HostNetwork pods use their node's network namespace and addresses:
	// they get no namespace of their own in the topology, and the server
	// attributes their traffic to the node.
	HostNetwork bool
	// ServiceAccount of the pods; empty means "default". It is created
	// when missing.
	ServiceAccount string
}

// Key returns "namespace/name", how ReplacePod names a workload.
func (w Workload) Key() string { return w.Namespace + "/" + w.Name }

// DefaultSpec is the demo's and the end-to-end suite's cluster: three zones
// of one region with two nodes each, an "api" Deployment in zone-a that
// reads from a "db" StatefulSet in zone-b, a "cache" Deployment next to the
// api (same-zone chatter), a "web" Deployment in zone-c, a "catalog"
// Deployment in zones a and b behind two Services (one with
// trafficDistribution PreferSameZone), a CronJob's pod, a
// bare pod, a host-network DaemonSet pod, and kubezonnet's own agent
// DaemonSet (host network, one pod per node: the pods its ServiceAccount
// tokens are bound to, see Env.AgentToken).
func DefaultSpec() Spec {
	s := Spec{
		Region: "region-1",
		Nodes: []NodeSpec{
			{"node-a1", "zone-a"}, {"node-a2", "zone-a"},
			{"node-b1", "zone-b"}, {"node-b2", "zone-b"},
			{"node-c1", "zone-c"}, {"node-c2", "zone-c"},
		},
		Workloads: []Workload{
			{Namespace: "shop", Name: "api", Kind: KindDeployment, Nodes: []string{"node-a1", "node-a2"}},
			{Namespace: "shop", Name: "cache", Kind: KindDeployment, Nodes: []string{"node-a1", "node-a2"}},
			{Namespace: "shop", Name: "db", Kind: KindStatefulSet, Nodes: []string{"node-b1", "node-b2"}},
			{Namespace: "shop", Name: "web", Kind: KindDeployment, Nodes: []string{"node-c1", "node-c2"}},
			{Namespace: "shop", Name: "catalog", Kind: KindDeployment, Nodes: []string{"node-a2", "node-b2"}},
			{Namespace: "reports", Name: "nightly", Kind: KindCronJob, Nodes: []string{"node-c1"}},
			{Namespace: "default", Name: "debug", Kind: KindPod, Nodes: []string{"node-b2"}},
			{Namespace: "monitoring", Name: "node-exporter", Kind: KindDaemonSet, Nodes: []string{"node-a1"}, HostNetwork: true},
		},
	}
	// The same catalog pods behind two Services: one asking for
	// zone-local routing, one without (as before a migration), so that
	// the first keeps zone-a's clients in their zone and the second
	// sends them across half the time: avoidable bytes.
	s.Services = []Service{
		{Namespace: "shop", Name: "catalog", Workload: "catalog", TrafficDistribution: "PreferSameZone",
			Ports: []ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: 8080}}},
		{Namespace: "shop", Name: "catalog-legacy", Workload: "catalog",
			Ports: []ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: 8080}, {Protocol: corev1.ProtocolUDP, Port: 53, TargetPort: 5353}}},
	}
	agent := Workload{Namespace: Namespace, Name: AgentDaemonSet, Kind: KindDaemonSet, HostNetwork: true, ServiceAccount: AgentServiceAccount}
	for _, n := range s.Nodes {
		agent.Nodes = append(agent.Nodes, n.Name)
	}
	s.Workloads = append(s.Workloads, agent)
	return s
}

// Validate checks that names are set and unique, kinds are known, and
// every pod is placed on a declared node.
func (s Spec) Validate() error {
	if s.Region == "" {
		return errors.New("spec: region is empty")
	}
	if len(s.Nodes) == 0 || len(s.Nodes) > 250 {
		return fmt.Errorf("spec: %d nodes, want 1 to 250", len(s.Nodes))
	}
	nodes := map[string]bool{}
	for _, n := range s.Nodes {
		if n.Name == "" || n.Zone == "" {
			return fmt.Errorf("spec: node %q has no name or no zone", n.Name)
		}
		if nodes[n.Name] {
			return fmt.Errorf("spec: node %q listed twice", n.Name)
		}
		nodes[n.Name] = true
	}
	workloads := map[string]bool{}
	pods := map[string]bool{}
	for _, w := range s.Workloads {
		if w.Namespace == "" || w.Name == "" {
			return fmt.Errorf("spec: workload %q has no namespace or no name", w.Key())
		}
		if workloads[w.Key()] {
			return fmt.Errorf("spec: workload %q listed twice", w.Key())
		}
		workloads[w.Key()] = true
		switch w.Kind {
		case KindDeployment, KindStatefulSet, KindDaemonSet, KindCronJob, KindJob, KindPod:
		default:
			return fmt.Errorf("spec: workload %q has unknown kind %q", w.Key(), w.Kind)
		}
		if len(w.Nodes) == 0 {
			return fmt.Errorf("spec: workload %q has no pods", w.Key())
		}
		for i, n := range w.Nodes {
			if !nodes[n] {
				return fmt.Errorf("spec: workload %q places a pod on unknown node %q", w.Key(), n)
			}
			// Pod names double as topology names, which are global.
			name := podName(w, i, 0)
			if pods[name] {
				return fmt.Errorf("spec: pod name %q of workload %q is not unique", name, w.Key())
			}
			pods[name] = true
		}
	}
	byKey := map[string]Workload{}
	for _, w := range s.Workloads {
		byKey[w.Key()] = w
	}
	services := map[string]bool{}
	for _, svc := range s.Services {
		if services[svc.Key()] {
			return fmt.Errorf("spec: service %q listed twice", svc.Key())
		}
		services[svc.Key()] = true
		if err := svc.validate(byKey); err != nil {
			return err
		}
	}
	return nil
}

// Testnet returns the network topology of the spec: one namespace per node
// and one per pod that is not on the host network, named after the pod.
func (s Spec) Testnet() testnet.Spec {
	out := testnet.Spec{Offloads: s.Offloads, StaticHosts: s.StaticHosts}
	for _, n := range s.Nodes {
		ns := testnet.NodeSpec{Name: n.Name, Zone: n.Zone}
		for _, w := range s.Workloads {
			if w.HostNetwork {
				continue
			}
			for i, on := range w.Nodes {
				if on == n.Name {
					ns.Pods = append(ns.Pods, podName(w, i, 0))
				}
			}
		}
		out.Nodes = append(out.Nodes, ns)
	}
	return out
}

// PlanTopology returns the addresses testnet.Build would give the spec's
// topology (the scheme documented in package testnet) without creating any
// namespace, for running the API side without root. Its namespace names
// are empty and Close does nothing.
func PlanTopology(s Spec) *testnet.Topology {
	t := &testnet.Topology{}
	for i, ns := range s.Testnet().Nodes {
		n := &testnet.Node{
			Name: ns.Name, Zone: ns.Zone, Index: i,
			IPv4: netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}),
			IPv6: netip.MustParseAddr(fmt.Sprintf("fd00:198:18::%x", i+1)),
			PodCIDRs: []netip.Prefix{
				netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i+1)),
				netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1)),
			},
		}
		for j, name := range ns.Pods {
			n.Pods = append(n.Pods, &testnet.Pod{
				Name: name, Node: n,
				IPv4: netip.AddrFrom4([4]byte{10, 244, byte(i + 1), byte(j + 2)}),
				IPv6: netip.MustParseAddr(fmt.Sprintf("fd00:10:244:%x::%x", i+1, j+2)),
			})
		}
		t.Nodes = append(t.Nodes, n)
	}
	return t
}

// podName returns the name of the index'th pod of w. Generation 0 is the
// pod created first; a replacement (ReplacePod) uses a later generation,
// which changes the random-looking suffix as a controller would, except for
// StatefulSet pods, whose names are stable.
func podName(w Workload, index, generation int) string {
	salt := strconv.Itoa(index) + "/" + strconv.Itoa(generation)
	switch w.Kind {
	case KindDeployment:
		return replicaSetName(w) + "-" + suffix(w.Key()+"/pod/"+salt, 5)
	case KindStatefulSet:
		return w.Name + "-" + strconv.Itoa(index)
	case KindDaemonSet:
		return w.Name + "-" + suffix(w.Key()+"/pod/"+salt, 5)
	case KindCronJob:
		return jobName(w) + "-" + suffix(w.Key()+"/pod/"+salt, 5)
	case KindJob:
		return w.Name + "-" + suffix(w.Key()+"/pod/"+salt, 5)
	default:
		if len(w.Nodes) == 1 && generation == 0 {
			return w.Name
		}
		return w.Name + "-" + strconv.Itoa(index) + "-" + strconv.Itoa(generation)
	}
}

// replicaSetName is the Deployment's ReplicaSet: name-<pod-template-hash>.
func replicaSetName(w Workload) string { return w.Name + "-" + templateHash(w) }

func templateHash(w Workload) string { return suffix(w.Key()+"/template", 10) }

// jobName is the CronJob's Job, named after a scheduled time in minutes as
// the CronJob controller does.
func jobName(w Workload) string { return w.Name + "-29000000" }

// suffix returns n characters from the alphabet Kubernetes uses for
// generated names, derived from seed so that names are reproducible.
func suffix(seed string, n int) string {
	const alphabet = "bcdfghjklmnpqrstvwxz2456789"
	h := fnv.New64a()
	h.Write([]byte(seed))
	v := h.Sum64()
	b := make([]byte, n)
	for i := range b {
		b[i] = alphabet[v%uint64(len(alphabet))]
		v /= uint64(len(alphabet))
		if v == 0 {
			h.Write([]byte{byte(i)})
			v = h.Sum64()
		}
	}
	return string(b)
}
