package resolve

import (
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// Workload kinds named through an intermediate owner.
const (
	kindReplicaSet = "ReplicaSet"
	kindDeployment = "Deployment"
	kindJob        = "Job"
)

// ownerKey names a ReplicaSet or Job whose own owner decides the workload of
// the pods it manages.
type ownerKey struct {
	kind, namespace, name string
}

// ownerStore looks up the metadata of ReplicaSets and Jobs. A nil store (or
// a nil indexer for one kind) means the owners are not readable, and naming
// falls back as described on workloadOf.
type ownerStore struct {
	replicaSets, jobs cache.Indexer
}

// controllerOf returns the controller (kind, name) of a ReplicaSet or Job;
// known is false when the object is not in the store or the store is absent.
func (s *ownerStore) controllerOf(k ownerKey) (kind, name string, known bool) {
	if s == nil {
		return "", "", false
	}
	idx := s.replicaSets
	if k.kind == kindJob {
		idx = s.jobs
	}
	if idx == nil {
		return "", "", false
	}
	obj, ok, err := idx.GetByKey(k.namespace + "/" + k.name)
	if err != nil || !ok {
		return "", "", false
	}
	m, ok := obj.(*metav1.PartialObjectMetadata)
	if !ok {
		return "", "", false
	}
	for _, r := range m.OwnerReferences {
		if r.Controller != nil && *r.Controller {
			return r.Kind, r.Name, true
		}
	}
	return "", "", true
}

// podOwner is what workload naming needs from a pod: its controller and
// the pod-template-hash label, kept on the pod's index state so the name can
// be recomputed when the owner's metadata arrives later.
type podOwner struct {
	kind, name, templateHash string
}

// ownerOf extracts the controller of a (transformed) pod.
func ownerOf(p *corev1.Pod) podOwner {
	for _, r := range p.OwnerReferences {
		if r.Controller != nil && *r.Controller {
			return podOwner{kind: r.Kind, name: r.Name, templateHash: p.Labels[labelPodTemplateHash]}
		}
	}
	return podOwner{}
}

// workloadOf names the workload of a pod, and returns the ReplicaSet or Job
// the name depends on, if any, so the index can rename the pod when that
// owner's metadata arrives or changes.
//
//   - no controller, or a Node (mirror pods of static manifests): the pod
//     itself, kind Pod;
//   - ReplicaSet: its controller (a Deployment, or e.g. an Argo Rollout) when
//     the ReplicaSet's metadata is known; a ReplicaSet without controller is
//     the workload itself. When the metadata is not known (owners not
//     readable, or the ReplicaSet not seen yet), the name pattern decides:
//     a ReplicaSet named "<deployment>-<pod-template-hash>" is taken to be
//     managed by Deployment "<deployment>";
//   - Job: its controller (a CronJob) when known, else the Job;
//   - anything else (StatefulSet, DaemonSet, ReplicationController, custom
//     controllers): the controller's own kind and name.
func workloadOf(namespace, pod string, o podOwner, owners *ownerStore) (name, kind string, via *ownerKey) {
	if o.kind == "" || o.name == "" || o.kind == "Node" {
		return pod, WorkloadKindPod, nil
	}
	switch o.kind {
	case kindReplicaSet, kindJob:
		k := &ownerKey{kind: o.kind, namespace: namespace, name: o.name}
		if ck, cn, known := owners.controllerOf(*k); known {
			if ck == "" || cn == "" {
				return o.name, o.kind, k
			}
			return cn, ck, k
		}
		if o.kind == kindReplicaSet && o.templateHash != "" {
			if d, ok := strings.CutSuffix(o.name, "-"+o.templateHash); ok && d != "" {
				return d, kindDeployment, k
			}
		}
		return o.name, o.kind, k
	default:
		return o.name, o.kind, nil
	}
}
