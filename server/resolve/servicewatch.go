package resolve

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
)

// watchServices registers the Service and EndpointSlice informers of f and
// returns what says they have synced; f is started by the caller. Without
// permission to list either (a ClusterRole from before they were needed),
// it warns and watches neither: Service then knows no virtual IP, and the
// rest of the resolver works as before rather than never turning ready.
// ok is false when ctx ended during the probe.
func (r *Resolver) watchServices(ctx context.Context, f informers.SharedInformerFactory) (synced []cache.InformerSynced, ok bool, err error) {
	for _, probe := range []struct {
		resource string
		list     func() error
	}{
		{"services", func() error {
			_, err := r.client.CoreV1().Services("").List(ctx, metav1.ListOptions{Limit: 1})
			return err
		}},
		{"endpointslices", func() error {
			_, err := r.client.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{Limit: 1})
			return err
		}},
	} {
		err := probe.list()
		if ctx.Err() != nil {
			return nil, false, nil
		}
		// Other errors are the API server's trouble: the informers retry
		// them like those of pods and nodes.
		if apierrors.IsForbidden(err) || apierrors.IsNotFound(err) {
			r.log.Warn("cannot list Services or EndpointSlices, flows to Service virtual IPs are not attributed to their Service", "resource", probe.resource, "err", err)
			return nil, true, nil
		}
	}

	svcInf := f.Core().V1().Services().Informer()
	if err := svcInf.SetTransform(serviceTransform); err != nil {
		return nil, false, fmt.Errorf("setting service transform: %w", err)
	}
	if err := r.watchErrors(svcInf, "services"); err != nil {
		return nil, false, err
	}
	svcReg, err := svcInf.AddEventHandler(r.serviceHandler())
	if err != nil {
		return nil, false, fmt.Errorf("watching services: %w", err)
	}

	sliceInf := f.Discovery().V1().EndpointSlices().Informer()
	if err := sliceInf.SetTransform(endpointSliceTransform); err != nil {
		return nil, false, fmt.Errorf("setting endpointslice transform: %w", err)
	}
	if err := r.watchErrors(sliceInf, "endpointslices"); err != nil {
		return nil, false, err
	}
	sliceReg, err := sliceInf.AddEventHandler(r.endpointSliceHandler())
	if err != nil {
		return nil, false, fmt.Errorf("watching endpointslices: %w", err)
	}
	return []cache.InformerSynced{svcReg.HasSynced, sliceReg.HasSynced}, true, nil
}

func (r *Resolver) serviceHandler() cache.ResourceEventHandler {
	return cache.ResourceEventHandlerDetailedFuncs{
		AddFunc: func(obj any, initial bool) {
			defer r.events.Add(1)
			if s, ok := obj.(*corev1.Service); ok {
				r.svc.upsertService(s, r.now().UnixNano(), initial)
			}
		},
		UpdateFunc: func(_, obj any) {
			defer r.events.Add(1)
			if s, ok := obj.(*corev1.Service); ok {
				r.svc.upsertService(s, r.now().UnixNano(), false)
			}
		},
		DeleteFunc: func(obj any) {
			defer r.events.Add(1)
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				if s, ok := t.Obj.(*corev1.Service); ok {
					obj = s
				} else if ns, name, err := cache.SplitMetaNamespaceKey(t.Key); err == nil {
					r.svc.deleteService(ns, name, "", r.now().UnixNano())
					return
				}
			}
			if s, ok := obj.(*corev1.Service); ok {
				r.svc.deleteService(s.Namespace, s.Name, s.UID, r.now().UnixNano())
			}
		},
	}
}

func (r *Resolver) endpointSliceHandler() cache.ResourceEventHandler {
	return cache.ResourceEventHandlerDetailedFuncs{
		AddFunc: func(obj any, initial bool) {
			defer r.events.Add(1)
			if es, ok := obj.(*discoveryv1.EndpointSlice); ok {
				r.svc.upsertSlice(es, r.now().UnixNano(), initial)
			}
		},
		UpdateFunc: func(_, obj any) {
			defer r.events.Add(1)
			if es, ok := obj.(*discoveryv1.EndpointSlice); ok {
				r.svc.upsertSlice(es, r.now().UnixNano(), false)
			}
		},
		DeleteFunc: func(obj any) {
			defer r.events.Add(1)
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				if ns, name, err := cache.SplitMetaNamespaceKey(t.Key); err == nil {
					r.svc.deleteSlice(ns, name, r.now().UnixNano())
				}
				return
			}
			if es, ok := obj.(*discoveryv1.EndpointSlice); ok {
				r.svc.deleteSlice(es.Namespace, es.Name, r.now().UnixNano())
			}
		},
	}
}

// serviceTransform keeps what the virtual IP index needs of a Service:
// its name, addresses, ports with their protocol, type and traffic
// distribution. Annotations, selectors and managed fields, often most of
// the object, go.
func serviceTransform(obj any) (any, error) {
	s, ok := obj.(*corev1.Service)
	if !ok {
		return obj, nil
	}
	out := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{
			Name:            s.Name,
			Namespace:       s.Namespace,
			UID:             s.UID,
			ResourceVersion: s.ResourceVersion,
		},
		Spec: corev1.ServiceSpec{
			Type:                s.Spec.Type,
			ClusterIP:           s.Spec.ClusterIP,
			ClusterIPs:          s.Spec.ClusterIPs,
			TrafficDistribution: s.Spec.TrafficDistribution,
		},
	}
	if len(s.Spec.Ports) > 0 {
		out.Spec.Ports = make([]corev1.ServicePort, len(s.Spec.Ports))
		for i, p := range s.Spec.Ports {
			out.Spec.Ports[i] = corev1.ServicePort{Protocol: p.Protocol, Port: p.Port}
		}
	}
	return out, nil
}

// endpointSliceTransform keeps what readiness per zone needs of an
// EndpointSlice: its Service label and, per endpoint, the ready
// condition, the zone and the zone hints. Addresses, target references,
// ports and the other conditions go.
func endpointSliceTransform(obj any) (any, error) {
	es, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return obj, nil
	}
	out := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name:            es.Name,
			Namespace:       es.Namespace,
			UID:             es.UID,
			ResourceVersion: es.ResourceVersion,
			Labels:          pickLabels(es.Labels, []string{discoveryv1.LabelServiceName}),
		},
		AddressType: es.AddressType,
	}
	if len(es.Endpoints) > 0 {
		out.Endpoints = make([]discoveryv1.Endpoint, len(es.Endpoints))
		for i, e := range es.Endpoints {
			out.Endpoints[i] = discoveryv1.Endpoint{Conditions: discoveryv1.EndpointConditions{Ready: e.Conditions.Ready}, Zone: e.Zone}
			if e.Hints != nil && len(e.Hints.ForZones) > 0 {
				out.Endpoints[i].Hints = &discoveryv1.EndpointHints{ForZones: e.Hints.ForZones}
			}
		}
	}
	return out, nil
}
