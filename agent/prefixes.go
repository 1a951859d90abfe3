package agent

import (
	"context"
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// nodeGetter reads one Node object: the agent needs nothing else of the
// API, and RBAC grants it only get on nodes.
type nodeGetter interface {
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Node, error)
}

// newNodeGetter builds a client from a kubeconfig file or, when path is
// empty, from the in-cluster service account.
func newNodeGetter(kubeconfig string) (nodeGetter, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("building Kubernetes client config (--kubeconfig %q): %w", kubeconfig, err)
	}
	cfg.UserAgent = "kubezonnet-agent"
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("building Kubernetes client: %w", err)
	}
	return cs.CoreV1().Nodes(), nil
}

// nodePrefixes returns the sources that belong to a node: its pod CIDRs and
// its own addresses (host-network pods send from them).
func nodePrefixes(n *corev1.Node) ([]netip.Prefix, error) {
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	if len(cidrs) == 0 {
		return nil, fmt.Errorf("node %s has no spec.podCIDRs (IPAM such as Cilium cluster-pool does not set them): list the node's pod ranges with --local-prefixes", n.Name)
	}
	var out []netip.Prefix
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return nil, fmt.Errorf("node %s: invalid pod CIDR %q: %w", n.Name, c, err)
		}
		out = append(out, p.Masked())
	}
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
			continue
		}
		ip, err := netip.ParseAddr(a.Address)
		if err != nil {
			continue
		}
		out = append(out, netip.PrefixFrom(ip, ip.BitLen()))
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return slices.Compact(out), nil
}
