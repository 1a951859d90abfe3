package testenv

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubezonnet/kubezonnet/internal/testnet"
)

// Service is a Kubernetes Service of the simulated cluster whose endpoints
// are the pods of one workload of its namespace. No controller runs, so
// the cluster writes its EndpointSlices itself (zones, readiness and, with
// a traffic distribution, the zone hints the EndpointSlice controller
// would set), and on a built network programs every node as kube-proxy's
// nftables mode would (testnet.ServiceDNAT).
type Service struct {
	Namespace, Name string
	// Workload is the name of the workload, in Namespace, whose pods are
	// the endpoints; it must not be on the host network.
	Workload string
	Ports    []ServicePort
	// TrafficDistribution is spec.trafficDistribution ("" for unset).
	// With it, a node sends to the ready endpoints of its own zone when
	// there are any, as kube-proxy does with zone hints; without it, to
	// any ready endpoint.
	TrafficDistribution string
}

// ServicePort is one port of a Service.
type ServicePort struct {
	Protocol   corev1.Protocol // TCP or UDP
	Port       uint16          // on the virtual IP
	TargetPort uint16          // on the endpoints
}

// Key returns "namespace/name".
func (s Service) Key() string { return s.Namespace + "/" + s.Name }

// validate checks s against the workloads of spec.
func (s Service) validate(workloads map[string]Workload) error {
	w, ok := workloads[s.Namespace+"/"+s.Workload]
	switch {
	case s.Namespace == "" || s.Name == "":
		return fmt.Errorf("spec: service %q has no namespace or no name", s.Key())
	case !ok:
		return fmt.Errorf("spec: service %q selects unknown workload %q", s.Key(), s.Workload)
	case w.HostNetwork:
		return fmt.Errorf("spec: service %q selects host-network workload %q", s.Key(), s.Workload)
	case len(s.Ports) == 0:
		return fmt.Errorf("spec: service %q has no ports", s.Key())
	}
	for _, p := range s.Ports {
		if (p.Protocol != corev1.ProtocolTCP && p.Protocol != corev1.ProtocolUDP) || p.Port == 0 || p.TargetPort == 0 {
			return fmt.Errorf("spec: service %q: port %+v: want TCP or UDP and non-zero ports", s.Key(), p)
		}
	}
	return nil
}

// serviceState is a created Service: its virtual addresses and which of
// its endpoints (by slot name) are ready.
type serviceState struct {
	spec     Service
	vips     []netip.Addr
	endpoint []string // slot names, in workload order
	notReady map[string]bool
}

// createService creates s and its EndpointSlices (one per address
// family), every endpoint ready.
func (cl *Cluster) createService(ctx context.Context, s Service) error {
	st := &serviceState{spec: s, notReady: map[string]bool{}}
	for _, name := range slices.Sorted(maps.Keys(cl.slots)) {
		if w := cl.slots[name].workload; w.Namespace == s.Namespace && w.Name == s.Workload {
			st.endpoint = append(st.endpoint, name)
		}
	}
	policy := corev1.IPFamilyPolicyPreferDualStack
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace},
		Spec: corev1.ServiceSpec{
			Type:           corev1.ServiceTypeClusterIP,
			Selector:       map[string]string{"app": s.Workload},
			IPFamilyPolicy: &policy,
		},
	}
	if s.TrafficDistribution != "" {
		td := s.TrafficDistribution
		svc.Spec.TrafficDistribution = &td
	}
	for _, p := range s.Ports {
		svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{
			Name: portName(p), Protocol: p.Protocol, Port: int32(p.Port),
		})
	}
	created, err := cl.client.CoreV1().Services(s.Namespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating service %s: %w", s.Key(), err)
	}
	for _, ip := range created.Spec.ClusterIPs {
		a, err := netip.ParseAddr(ip)
		if err != nil {
			return fmt.Errorf("service %s: cluster IP %q: %w", s.Key(), ip, err)
		}
		st.vips = append(st.vips, a)
	}
	cl.services[s.Key()] = st
	return cl.writeSlices(ctx, st)
}

func portName(p ServicePort) string {
	return fmt.Sprintf("%s-%d", strings.ToLower(string(p.Protocol)), p.Port)
}

// writeSlices creates or updates st's EndpointSlices from its endpoints'
// readiness.
func (cl *Cluster) writeSlices(ctx context.Context, st *serviceState) error {
	s := st.spec
	for _, family := range []discoveryv1.AddressType{discoveryv1.AddressTypeIPv4, discoveryv1.AddressTypeIPv6} {
		es := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{
				Name: s.Name + "-" + strings.ToLower(string(family)), Namespace: s.Namespace,
				Labels: map[string]string{discoveryv1.LabelServiceName: s.Name, discoveryv1.LabelManagedBy: "testenv"},
			},
			AddressType: family,
		}
		for _, p := range s.Ports {
			name, proto, port := portName(p), p.Protocol, int32(p.TargetPort)
			es.Ports = append(es.Ports, discoveryv1.EndpointPort{Name: &name, Protocol: &proto, Port: &port})
		}
		for _, slotName := range st.endpoint {
			sl := cl.slots[slotName]
			addr := sl.ipv4
			if family == discoveryv1.AddressTypeIPv6 {
				addr = sl.ipv6
			}
			ready := !st.notReady[slotName]
			node, zone := sl.node.Name, sl.node.Zone
			ep := discoveryv1.Endpoint{
				Addresses:  []string{addr.String()},
				Conditions: discoveryv1.EndpointConditions{Ready: &ready},
				NodeName:   &node, Zone: &zone,
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: s.Namespace, Name: sl.pod.Name, UID: sl.pod.UID},
			}
			if s.TrafficDistribution != "" {
				ep.Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: zone}}}
			}
			es.Endpoints = append(es.Endpoints, ep)
		}
		slices := cl.client.DiscoveryV1().EndpointSlices(s.Namespace)
		cur, err := slices.Get(ctx, es.Name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			_, err = slices.Create(ctx, es, metav1.CreateOptions{})
		case err == nil:
			es.ResourceVersion = cur.ResourceVersion
			_, err = slices.Update(ctx, es, metav1.UpdateOptions{})
		}
		if err != nil {
			return fmt.Errorf("writing EndpointSlice %s/%s: %w", s.Namespace, es.Name, err)
		}
	}
	return nil
}

// ServiceVIPs returns the virtual addresses the API server gave Service
// key ("namespace/name"), IPv4 first.
func (cl *Cluster) ServiceVIPs(key string) []netip.Addr {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if st, ok := cl.services[key]; ok {
		return slices.Clone(st.vips)
	}
	return nil
}

// SetEndpointReady turns the endpoint of Service key in slot ready or not
// ready: its EndpointSlices change in the API server and, on a built
// network, every node's rules stop or start sending new connections to it.
func (cl *Cluster) SetEndpointReady(ctx context.Context, key, slotName string, ready bool) error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	st, ok := cl.services[key]
	if !ok {
		return fmt.Errorf("service %q is not in the spec", key)
	}
	if !slices.Contains(st.endpoint, slotName) {
		return fmt.Errorf("service %q has no endpoint in slot %q", key, slotName)
	}
	st.notReady[slotName] = !ready
	if err := cl.writeSlices(ctx, st); err != nil {
		return err
	}
	if cl.kubeProxy {
		return cl.programService(ctx, st)
	}
	return nil
}

// ProgramKubeProxy programs every Service on every node of the built
// network, as kube-proxy would; from then on SetEndpointReady keeps the
// rules current.
func (cl *Cluster) ProgramKubeProxy(ctx context.Context) error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	cl.kubeProxy = true
	for _, key := range slices.Sorted(maps.Keys(cl.services)) {
		if err := cl.programService(ctx, cl.services[key]); err != nil {
			return err
		}
	}
	return nil
}

// programService writes st's rules on every node: per node, the ready
// endpoints of its zone when the Service has a traffic distribution and
// there are any, else every ready endpoint.
func (cl *Cluster) programService(ctx context.Context, st *serviceState) error {
	s := st.spec
	for _, node := range cl.Topology.Nodes {
		for _, vip := range st.vips {
			for _, p := range s.Ports {
				var all, local []netip.AddrPort
				for _, slotName := range st.endpoint {
					if st.notReady[slotName] {
						continue
					}
					sl := cl.slots[slotName]
					addr := sl.ipv4
					if vip.Is6() {
						addr = sl.ipv6
					}
					ap := netip.AddrPortFrom(addr, p.TargetPort)
					all = append(all, ap)
					if sl.node.Zone == node.Zone {
						local = append(local, ap)
					}
				}
				eps := all
				if s.TrafficDistribution != "" && len(local) > 0 {
					eps = local
				}
				family := "4"
				if vip.Is6() {
					family = "6"
				}
				sp := testnet.ServicePort{
					Name:  fmt.Sprintf("%s-%s-%s-%s", s.Namespace, s.Name, portName(p), family),
					Proto: strings.ToLower(string(p.Protocol)), VIP: netip.AddrPortFrom(vip, p.Port), Endpoints: eps,
				}
				if err := testnet.ServiceDNAT(ctx, node.NS, sp); err != nil {
					return err
				}
			}
		}
	}
	return nil
}
