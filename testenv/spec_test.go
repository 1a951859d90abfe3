package testenv

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

var tcp80 = []ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: 8080}}

// withService is DefaultSpec with one more Service.
func withService(svc Service) Spec {
	s := DefaultSpec()
	s.Services = append(s.Services, svc)
	return s
}

func TestSpecValidate(t *testing.T) {
	node := []NodeSpec{{"n1", "z1"}}
	tests := []struct {
		name    string
		spec    Spec
		wantErr string
	}{
		{"default", DefaultSpec(), ""},
		{"no region", Spec{Nodes: node}, "region"},
		{"no nodes", Spec{Region: "r"}, "0 nodes"},
		{"node without zone", Spec{Region: "r", Nodes: []NodeSpec{{"n1", ""}}}, "no zone"},
		{"duplicate node", Spec{Region: "r", Nodes: []NodeSpec{{"n1", "z"}, {"n1", "z"}}}, "twice"},
		{"unknown kind", Spec{Region: "r", Nodes: node, Workloads: []Workload{{Namespace: "a", Name: "b", Kind: "Rollout", Nodes: []string{"n1"}}}}, "unknown kind"},
		{"unknown node", Spec{Region: "r", Nodes: node, Workloads: []Workload{{Namespace: "a", Name: "b", Kind: KindPod, Nodes: []string{"n9"}}}}, "unknown node"},
		{"no pods", Spec{Region: "r", Nodes: node, Workloads: []Workload{{Namespace: "a", Name: "b", Kind: KindPod}}}, "no pods"},
		{"duplicate workload", Spec{Region: "r", Nodes: node, Workloads: []Workload{
			{Namespace: "a", Name: "b", Kind: KindPod, Nodes: []string{"n1"}},
			{Namespace: "a", Name: "b", Kind: KindDeployment, Nodes: []string{"n1"}},
		}}, "twice"},
		// Pod names are global in the topology: the same StatefulSet name
		// in two namespaces collides.
		{"colliding pod names", Spec{Region: "r", Nodes: node, Workloads: []Workload{
			{Namespace: "a", Name: "db", Kind: KindStatefulSet, Nodes: []string{"n1"}},
			{Namespace: "b", Name: "db", Kind: KindStatefulSet, Nodes: []string{"n1"}},
		}}, "not unique"},
		{"service of an unknown workload", withService(Service{Namespace: "shop", Name: "s", Workload: "nope", Ports: tcp80}), "unknown workload"},
		{"service of host-network pods", withService(Service{Namespace: "monitoring", Name: "s", Workload: "node-exporter", Ports: tcp80}), "host-network"},
		{"service without ports", withService(Service{Namespace: "shop", Name: "s", Workload: "db"}), "no ports"},
		{"service port without target", withService(Service{Namespace: "shop", Name: "s", Workload: "db",
			Ports: []ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80}}}), "non-zero"},
		{"service listed twice", withService(DefaultSpec().Services[0]), "twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.spec.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

// Every non-host-network pod gets a namespace on its node, host-network
// pods none, and replacement names differ from the originals (except a
// StatefulSet's).
func TestSpecTestnet(t *testing.T) {
	spec := DefaultSpec()
	tn := spec.Testnet()
	where := map[string]string{}
	for _, n := range tn.Nodes {
		for _, p := range n.Pods {
			if _, dup := where[p]; dup {
				t.Errorf("pod %s placed twice", p)
			}
			where[p] = n.Name
		}
	}
	for _, w := range spec.Workloads {
		for i, node := range w.Nodes {
			name := podName(w, i, 0)
			got, ok := where[name]
			if w.HostNetwork {
				if ok {
					t.Errorf("host-network pod %s has a namespace on %s", name, got)
				}
				continue
			}
			if got != node {
				t.Errorf("pod %s of %s on %q, want %q", name, w.Key(), got, node)
			}
			if again := podName(w, i, 0); again != name {
				t.Errorf("pod name of %s not reproducible: %s then %s", w.Key(), name, again)
			}
			next := podName(w, i, 1)
			if (next == name) != (w.Kind == KindStatefulSet) {
				t.Errorf("%s %s: replacement name %s for %s", w.Kind, w.Key(), next, name)
			}
		}
	}
}

// PlanTopology, used without root, gives the addresses testnet.Build
// really assigns.
func TestPlanTopologyMatchesBuild(t *testing.T) {
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	spec := DefaultSpec()
	built, err := testnet.Build(ctx, spec.Testnet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := built.Close(); err != nil {
			t.Errorf("closing the topology: %v", err)
		}
	})
	plan := PlanTopology(spec)
	if len(plan.Nodes) != len(built.Nodes) {
		t.Fatalf("%d planned nodes, %d built", len(plan.Nodes), len(built.Nodes))
	}
	for i, b := range built.Nodes {
		p := plan.Nodes[i]
		if p.Name != b.Name || p.Zone != b.Zone || p.IPv4 != b.IPv4 || p.IPv6 != b.IPv6 ||
			len(p.PodCIDRs) != len(b.PodCIDRs) || len(p.Pods) != len(b.Pods) {
			t.Fatalf("node %d: planned %+v, built %+v", i, p, b)
		}
		for j := range b.PodCIDRs {
			if p.PodCIDRs[j] != b.PodCIDRs[j] {
				t.Errorf("node %s: planned pod CIDR %s, built %s", b.Name, p.PodCIDRs[j], b.PodCIDRs[j])
			}
		}
		for j, bp := range b.Pods {
			pp := p.Pods[j]
			if pp.Name != bp.Name || pp.IPv4 != bp.IPv4 || pp.IPv6 != bp.IPv6 {
				t.Errorf("pod %d of %s: planned %s %s %s, built %s %s %s", j, b.Name, pp.Name, pp.IPv4, pp.IPv6, bp.Name, bp.IPv4, bp.IPv6)
			}
		}
	}
}
