package resolve

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// Node labels that place a node. The beta zone and region labels are read as
// a fallback for old clusters; the GA ones win when both are present.
const (
	LabelZone       = "topology.kubernetes.io/zone"
	LabelRegion     = "topology.kubernetes.io/region"
	labelZoneBeta   = "failure-domain.beta.kubernetes.io/zone"
	labelRegionBeta = "failure-domain.beta.kubernetes.io/region"
)

// labelPodTemplateHash is kept on pods even when the user asks for no labels:
// it lets a ReplicaSet name be traced to its Deployment when ReplicaSets
// cannot be read (see workload.go).
const labelPodTemplateHash = "pod-template-hash"

// podTransform returns the informer transform for pods. The informer cache
// then holds only what resolution needs: a full Pod object is several KB
// (managed fields, spec of every container, conditions), the trimmed one a
// few hundred bytes. It is idempotent, as client-go requires, and passes
// anything that is not a Pod (tombstones) through unchanged.
func podTransform(keepLabels []string) cache.TransformFunc {
	return func(obj any) (any, error) {
		p, ok := obj.(*corev1.Pod)
		if !ok {
			return obj, nil
		}
		out := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{
				Name:              p.Name,
				Namespace:         p.Namespace,
				UID:               p.UID,
				ResourceVersion:   p.ResourceVersion,
				DeletionTimestamp: p.DeletionTimestamp,
				Labels:            pickLabels(p.Labels, keepLabels, labelPodTemplateHash),
				OwnerReferences:   controllerRef(p.OwnerReferences),
			},
			Spec: corev1.PodSpec{
				NodeName:    p.Spec.NodeName,
				HostNetwork: p.Spec.HostNetwork,
			},
			Status: corev1.PodStatus{
				Phase:  p.Status.Phase,
				PodIP:  p.Status.PodIP,
				PodIPs: p.Status.PodIPs,
			},
		}
		return out, nil
	}
}

// nodeTransform keeps a node's name, placement labels and addresses.
func nodeTransform(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil
	}
	out := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name:            n.Name,
			UID:             n.UID,
			ResourceVersion: n.ResourceVersion,
			Labels:          pickLabels(n.Labels, []string{LabelZone, LabelRegion, labelZoneBeta, labelRegionBeta}),
		},
	}
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP || a.Type == corev1.NodeExternalIP {
			out.Status.Addresses = append(out.Status.Addresses, a)
		}
	}
	return out, nil
}

// ownerTransform keeps what naming a workload needs from a ReplicaSet or Job
// seen through the metadata API: its name and its controller.
func ownerTransform(obj any) (any, error) {
	m, ok := obj.(*metav1.PartialObjectMetadata)
	if !ok {
		return obj, nil
	}
	return &metav1.PartialObjectMetadata{
		TypeMeta: m.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{
			Name:            m.Name,
			Namespace:       m.Namespace,
			UID:             m.UID,
			ResourceVersion: m.ResourceVersion,
			OwnerReferences: controllerRef(m.OwnerReferences),
		},
	}, nil
}

// pickLabels copies only the wanted labels; nil when none are present.
func pickLabels(in map[string]string, want []string, extra ...string) map[string]string {
	var out map[string]string
	add := func(k string) {
		if v, ok := in[k]; ok {
			if out == nil {
				out = make(map[string]string, 2)
			}
			out[k] = v
		}
	}
	for _, k := range want {
		add(k)
	}
	for _, k := range extra {
		add(k)
	}
	return out
}

// controllerRef keeps the managing owner only (the one with controller=true),
// trimmed to kind and name: that is all workload naming reads.
func controllerRef(refs []metav1.OwnerReference) []metav1.OwnerReference {
	for _, r := range refs {
		if r.Controller != nil && *r.Controller {
			return []metav1.OwnerReference{{APIVersion: r.APIVersion, Kind: r.Kind, Name: r.Name, UID: r.UID, Controller: r.Controller}}
		}
	}
	return nil
}
