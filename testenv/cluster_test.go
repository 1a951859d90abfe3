package testenv

import (
	"context"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// topOwner follows controller owner references through the API server up
// to the object that has none, checking that every reference names an
// existing object with that UID. It returns the top owner's kind and name
// (the pod's own for a bare pod).
func topOwner(ctx context.Context, t *testing.T, c kubernetes.Interface, pod *corev1.Pod) (kind, name string) {
	t.Helper()
	kind, name = "Pod", pod.Name
	refs := pod.OwnerReferences
	for len(refs) > 0 {
		if len(refs) != 1 || refs[0].Controller == nil || !*refs[0].Controller {
			t.Fatalf("%s %s: owner references %+v, want one controller", kind, name, refs)
		}
		ref := refs[0]
		var meta metav1.ObjectMeta
		switch ref.Kind {
		case "ReplicaSet":
			o, err := c.AppsV1().ReplicaSets(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatalf("owner of %s %s: %v", kind, name, err)
			}
			meta = o.ObjectMeta
		case "Deployment":
			o, err := c.AppsV1().Deployments(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatalf("owner of %s %s: %v", kind, name, err)
			}
			meta = o.ObjectMeta
		case "StatefulSet":
			o, err := c.AppsV1().StatefulSets(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatalf("owner of %s %s: %v", kind, name, err)
			}
			meta = o.ObjectMeta
		case "DaemonSet":
			o, err := c.AppsV1().DaemonSets(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatalf("owner of %s %s: %v", kind, name, err)
			}
			meta = o.ObjectMeta
		case "Job":
			o, err := c.BatchV1().Jobs(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatalf("owner of %s %s: %v", kind, name, err)
			}
			meta = o.ObjectMeta
		case "CronJob":
			o, err := c.BatchV1().CronJobs(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatalf("owner of %s %s: %v", kind, name, err)
			}
			meta = o.ObjectMeta
		default:
			t.Fatalf("%s %s: owner of unexpected kind %s", kind, name, ref.Kind)
		}
		if meta.UID != ref.UID {
			t.Fatalf("%s %s: owner %s %s has UID %s, the reference says %s", kind, name, ref.Kind, ref.Name, meta.UID, ref.UID)
		}
		kind, name, refs = ref.Kind, ref.Name, meta.OwnerReferences
	}
	return kind, name
}

func podIPs(p *corev1.Pod) []string {
	var out []string
	for _, ip := range p.Status.PodIPs {
		out = append(out, ip.IP)
	}
	return out
}

// The objects in the API server (read back, not the ones CreateCluster
// returned) describe the topology: zones, CIDRs, addresses, placement,
// owners.
func TestClusterMatchesTopology(t *testing.T) {
	env := sharedEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := env.ControlPlane.AdminClient()
	if err != nil {
		t.Fatal(err)
	}
	spec := env.Cluster.Spec

	// Only this cluster's objects: other tests add theirs (another region,
	// other namespaces) to the shared API server.
	nodes, err := c.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: LabelRegion + "=" + spec.Region})
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes.Items) != len(spec.Nodes) {
		t.Errorf("%d nodes in the API, want %d", len(nodes.Items), len(spec.Nodes))
	}
	for _, n := range nodes.Items {
		tn := env.Topology.Node(n.Name)
		if tn == nil {
			t.Errorf("node %s is not in the topology", n.Name)
			continue
		}
		if n.Labels[LabelZone] != tn.Zone || n.Labels[LabelRegion] != spec.Region {
			t.Errorf("node %s: zone %q region %q, want %q %q", n.Name, n.Labels[LabelZone], n.Labels[LabelRegion], tn.Zone, spec.Region)
		}
		var cidrs []string
		for _, p := range tn.PodCIDRs {
			cidrs = append(cidrs, p.String())
		}
		if !slices.Equal(n.Spec.PodCIDRs, cidrs) {
			t.Errorf("node %s: podCIDRs %v, want %v", n.Name, n.Spec.PodCIDRs, cidrs)
		}
		var internal []string
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				internal = append(internal, a.Address)
			}
		}
		if want := []string{tn.IPv4.String(), tn.IPv6.String()}; !slices.Equal(internal, want) {
			t.Errorf("node %s: InternalIPs %v, want %v", n.Name, internal, want)
		}
	}

	byName := map[string]*corev1.Pod{}
	seen := map[string]bool{}
	listed := 0
	for _, w := range spec.Workloads {
		if seen[w.Namespace] {
			continue
		}
		seen[w.Namespace] = true
		pods, err := c.CoreV1().Pods(w.Namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for i := range pods.Items {
			byName[pods.Items[i].Namespace+"/"+pods.Items[i].Name] = &pods.Items[i]
		}
		listed += len(pods.Items)
	}
	want := 0
	for _, w := range spec.Workloads {
		for i, node := range w.Nodes {
			want++
			name := podName(w, i, 0)
			p := byName[w.Namespace+"/"+name]
			if p == nil {
				t.Errorf("pod %s/%s of %s %s is not in the API", w.Namespace, name, w.Kind, w.Name)
				continue
			}
			if p.Spec.NodeName != node || p.Status.Phase != corev1.PodRunning || p.Spec.HostNetwork != w.HostNetwork {
				t.Errorf("pod %s: node %q phase %q hostNetwork %v, want %q Running %v",
					name, p.Spec.NodeName, p.Status.Phase, p.Spec.HostNetwork, node, w.HostNetwork)
			}
			var wantIPs []string
			if w.HostNetwork {
				tn := env.Topology.Node(node)
				wantIPs = []string{tn.IPv4.String(), tn.IPv6.String()}
			} else if tp := env.Topology.Pod(name); tp == nil || tp.Node.Name != node {
				t.Errorf("pod %s is not on node %s in the topology", name, node)
			} else {
				wantIPs = []string{tp.IPv4.String(), tp.IPv6.String()}
			}
			if got := podIPs(p); !slices.Equal(got, wantIPs) {
				t.Errorf("pod %s: podIPs %v, want %v", name, got, wantIPs)
			}
			if kind, owner := topOwner(ctx, t, c, p); kind != w.Kind || (w.Kind != KindPod && owner != w.Name) {
				t.Errorf("pod %s: top owner %s %s, want %s %s", name, kind, owner, w.Kind, w.Name)
			}
		}
	}
	if listed != want {
		t.Errorf("%d pods in the cluster's namespaces, want %d", listed, want)
	}
}

// ReplacePod reuses an IP: the old pod is gone, exactly one pod holds the
// IPs, and it belongs to the workload asked for.
func TestReplacePod(t *testing.T) {
	env := sharedEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := env.ControlPlane.AdminClient()
	if err != nil {
		t.Fatal(err)
	}
	// A cluster of its own (other node names, another namespace) on the
	// shared API server, so that the default cluster stays as created.
	spec := Spec{
		Region: "region-r",
		Nodes:  []NodeSpec{{"rp-node-1", "zone-r"}},
		Workloads: []Workload{
			{Namespace: "rp", Name: "front", Kind: KindDeployment, Nodes: []string{"rp-node-1"}},
			{Namespace: "rp", Name: "store", Kind: KindStatefulSet, Nodes: []string{"rp-node-1"}},
			{Namespace: "rp", Name: "other", Kind: KindDeployment, Nodes: []string{"rp-node-1"}},
		},
	}
	cl, err := CreateCluster(ctx, c, spec, PlanTopology(spec))
	if err != nil {
		t.Fatal(err)
	}
	front := podName(spec.Workloads[0], 0, 0)
	store := podName(spec.Workloads[1], 0, 0)

	tests := []struct {
		slot, workload   string
		wantKind, wantTo string
		sameName         bool
	}{
		{slot: front, workload: "", wantKind: "Deployment", wantTo: "front"},
		{slot: store, workload: "", wantKind: "StatefulSet", wantTo: "store", sameName: true},
		{slot: front, workload: "rp/other", wantKind: "Deployment", wantTo: "other"},
	}
	for _, tt := range tests {
		old, repl, err := cl.ReplacePod(ctx, tt.slot, tt.workload)
		if err != nil {
			t.Fatalf("replace %s with %q: %v", tt.slot, tt.workload, err)
		}
		if _, err := c.CoreV1().Pods("rp").Get(ctx, old.Name, metav1.GetOptions{}); err == nil && !tt.sameName {
			t.Errorf("old pod %s still exists", old.Name)
		}
		if (repl.Name == old.Name) != tt.sameName || repl.UID == old.UID {
			t.Errorf("replacement of %s is %s (uid %s, old %s), same name wanted: %v", old.Name, repl.Name, repl.UID, old.UID, tt.sameName)
		}
		list, err := c.CoreV1().Pods("rp").List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var holders []*corev1.Pod
		for i := range list.Items {
			if slices.Equal(podIPs(&list.Items[i]), podIPs(old)) {
				holders = append(holders, &list.Items[i])
			}
		}
		if len(holders) != 1 || holders[0].UID != repl.UID {
			t.Fatalf("pods holding %v after replacing %s: %d, want only the replacement", podIPs(old), old.Name, len(holders))
		}
		if holders[0].Spec.NodeName != old.Spec.NodeName || holders[0].Status.Phase != corev1.PodRunning {
			t.Errorf("replacement on %q phase %q, want %q Running", holders[0].Spec.NodeName, holders[0].Status.Phase, old.Spec.NodeName)
		}
		if kind, name := topOwner(ctx, t, c, holders[0]); kind != tt.wantKind || name != tt.wantTo {
			t.Errorf("replacement of %s owned by %s %s, want %s %s", old.Name, kind, name, tt.wantKind, tt.wantTo)
		}
		if got := cl.Pod(tt.slot); got == nil || got.UID != repl.UID {
			t.Errorf("Pod(%q) does not return the replacement", tt.slot)
		}
	}
}
