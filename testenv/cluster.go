package testenv

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"sort"
	"sync"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/kubezonnet/kubezonnet/internal/testnet"
)

// Well-known node labels the server reads zones and regions from.
const (
	LabelZone   = "topology.kubernetes.io/zone"
	LabelRegion = "topology.kubernetes.io/region"
)

// Cluster holds the API objects created for a Spec and its topology. No
// controllers run, so it created everything a controller would have
// (ReplicaSets, Jobs, Pods and their status) itself; objects change only
// through its methods.
type Cluster struct {
	Spec     Spec
	Topology *testnet.Topology

	client kubernetes.Interface
	owners map[string]metav1.OwnerReference // pods' direct owner by workload key
	labels map[string]map[string]string     // pods' labels by workload key

	mu       sync.Mutex
	nodes    map[string]*corev1.Node
	slots    map[string]*slot // by slot name (see Pod)
	services map[string]*serviceState
	// kubeProxy: the nodes' Service rules are programmed (a built
	// network, ProgramKubeProxy) and follow endpoint readiness.
	kubeProxy bool
	gen       int
}

// slot is a place a pod runs: a topology pod namespace, or a host-network
// pod's node. ReplacePod puts a new pod in an existing slot.
type slot struct {
	name     string
	node     *testnet.Node
	ipv4     netip.Addr
	ipv6     netip.Addr
	hostNet  bool
	workload Workload
	index    int
	pod      *corev1.Pod
}

// CreateCluster creates, through c, the Nodes, namespaces (each with its
// "default" ServiceAccount), workloads and Pods of spec, with the addresses
// of topo (from testnet.Build, or PlanTopology without root).
func CreateCluster(ctx context.Context, c kubernetes.Interface, spec Spec, topo *testnet.Topology) (*Cluster, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	cl := &Cluster{
		Spec: spec, Topology: topo, client: c,
		owners: map[string]metav1.OwnerReference{}, labels: map[string]map[string]string{},
		nodes: map[string]*corev1.Node{}, slots: map[string]*slot{}, services: map[string]*serviceState{},
	}
	for _, ns := range spec.Nodes {
		tn := topo.Node(ns.Name)
		if tn == nil {
			return nil, fmt.Errorf("node %s of the spec is not in the topology", ns.Name)
		}
		if err := cl.createNode(ctx, tn); err != nil {
			return nil, err
		}
	}
	accounts := map[string]bool{}
	for _, w := range spec.Workloads {
		for _, sa := range []string{"default", w.ServiceAccount} {
			if key := w.Namespace + "/" + sa; sa != "" && !accounts[key] {
				accounts[key] = true
				if err := ensureServiceAccount(ctx, c, w.Namespace, sa); err != nil {
					return nil, err
				}
			}
		}
		if err := cl.createWorkload(ctx, w); err != nil {
			return nil, err
		}
		for i, node := range w.Nodes {
			s := &slot{name: podName(w, i, 0), workload: w, index: i, hostNet: w.HostNetwork}
			s.node = topo.Node(node)
			if w.HostNetwork {
				s.ipv4, s.ipv6 = s.node.IPv4, s.node.IPv6
			} else {
				tp := topo.Pod(s.name)
				if tp == nil || tp.Node != s.node {
					return nil, fmt.Errorf("pod %s on node %s is not in the topology", s.name, node)
				}
				s.ipv4, s.ipv6 = tp.IPv4, tp.IPv6
			}
			pod, err := cl.createPod(ctx, s, w, s.name)
			if err != nil {
				return nil, err
			}
			s.pod = pod
			cl.slots[s.name] = s
		}
	}
	for _, svc := range spec.Services {
		if err := cl.createService(ctx, svc); err != nil {
			return nil, err
		}
	}
	return cl, nil
}

// createNode creates the Node with its zone labels and pod CIDRs, then
// sets its addresses and Ready condition through nodes/status, as a
// kubelet would.
func (cl *Cluster) createNode(ctx context.Context, tn *testnet.Node) error {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: tn.Name, Labels: map[string]string{
			LabelZone:                tn.Zone,
			LabelRegion:              cl.Spec.Region,
			"kubernetes.io/hostname": tn.Name,
			"kubernetes.io/os":       "linux",
		}},
	}
	for _, p := range tn.PodCIDRs {
		node.Spec.PodCIDRs = append(node.Spec.PodCIDRs, p.String())
	}
	if len(node.Spec.PodCIDRs) > 0 {
		node.Spec.PodCIDR = node.Spec.PodCIDRs[0]
	}
	created, err := cl.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating node %s: %w", tn.Name, err)
	}
	status := corev1.NodeStatus{
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: tn.IPv4.String()},
			{Type: corev1.NodeInternalIP, Address: tn.IPv6.String()},
			{Type: corev1.NodeHostName, Address: tn.Name},
		},
		Conditions: []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now(),
		}},
	}
	body, err := statusPatch(status)
	if err != nil {
		return err
	}
	patched, err := cl.client.CoreV1().Nodes().Patch(ctx, created.Name, types.StrategicMergePatchType, body, metav1.PatchOptions{}, "status")
	if err != nil {
		return fmt.Errorf("patching nodes/status of %s: %w", created.Name, err)
	}
	cl.nodes[tn.Name] = patched
	return nil
}

// statusPatch is a strategic merge patch that sets status.
func statusPatch(status any) ([]byte, error) {
	b, err := json.Marshal(map[string]any{"status": status})
	if err != nil {
		return nil, fmt.Errorf("encoding a status patch: %w", err)
	}
	return b, nil
}

// podTemplate is the template every workload's pods are made from.
func podTemplate(w Workload, labels map[string]string, restart corev1.RestartPolicy) corev1.PodTemplateSpec {
	return corev1.PodTemplateSpec{
		ObjectMeta: metav1.ObjectMeta{Labels: labels},
		Spec: corev1.PodSpec{
			HostNetwork:   w.HostNetwork,
			RestartPolicy: restart,
			Containers: []corev1.Container{{
				// Nothing pulls it: no kubelet runs.
				Name: "main", Image: "registry.invalid/kubezonnet-testenv/" + w.Name + ":v1",
			}},
		},
	}
}

// createWorkload creates the workload object and, where a controller sits
// between it and its pods (Deployment -> ReplicaSet, CronJob -> Job), the
// intermediate object, and records the pods' owner and labels.
func (cl *Cluster) createWorkload(ctx context.Context, w Workload) error {
	labels := map[string]string{"app": w.Name}
	replicas := int32(len(w.Nodes))
	selector := &metav1.LabelSelector{MatchLabels: map[string]string{"app": w.Name}}
	ctrl := func(apiVersion, kind, name string, uid types.UID) metav1.OwnerReference {
		yes := true
		return metav1.OwnerReference{APIVersion: apiVersion, Kind: kind, Name: name, UID: uid, Controller: &yes, BlockOwnerDeletion: &yes}
	}
	meta := func(name string) metav1.ObjectMeta {
		return metav1.ObjectMeta{Name: name, Namespace: w.Namespace, Labels: map[string]string{"app": w.Name}}
	}
	var err error
	switch w.Kind {
	case KindDeployment:
		var d *appsv1.Deployment
		d, err = cl.client.AppsV1().Deployments(w.Namespace).Create(ctx, &appsv1.Deployment{
			ObjectMeta: meta(w.Name),
			Spec:       appsv1.DeploymentSpec{Replicas: &replicas, Selector: selector, Template: podTemplate(w, labels, corev1.RestartPolicyAlways)},
		}, metav1.CreateOptions{})
		if err != nil {
			break
		}
		hash := templateHash(w)
		rsLabels := map[string]string{"app": w.Name, "pod-template-hash": hash}
		rsMeta := meta(replicaSetName(w))
		rsMeta.Labels = rsLabels
		rsMeta.OwnerReferences = []metav1.OwnerReference{ctrl("apps/v1", "Deployment", d.Name, d.UID)}
		var rs *appsv1.ReplicaSet
		rs, err = cl.client.AppsV1().ReplicaSets(w.Namespace).Create(ctx, &appsv1.ReplicaSet{
			ObjectMeta: rsMeta,
			Spec: appsv1.ReplicaSetSpec{
				Replicas: &replicas, Selector: &metav1.LabelSelector{MatchLabels: rsLabels},
				Template: podTemplate(w, rsLabels, corev1.RestartPolicyAlways),
			},
		}, metav1.CreateOptions{})
		if err != nil {
			break
		}
		labels = rsLabels
		cl.owners[w.Key()] = ctrl("apps/v1", "ReplicaSet", rs.Name, rs.UID)
	case KindStatefulSet:
		var s *appsv1.StatefulSet
		s, err = cl.client.AppsV1().StatefulSets(w.Namespace).Create(ctx, &appsv1.StatefulSet{
			ObjectMeta: meta(w.Name),
			Spec: appsv1.StatefulSetSpec{
				Replicas: &replicas, Selector: selector, ServiceName: w.Name,
				Template: podTemplate(w, labels, corev1.RestartPolicyAlways),
			},
		}, metav1.CreateOptions{})
		if err == nil {
			cl.owners[w.Key()] = ctrl("apps/v1", "StatefulSet", s.Name, s.UID)
		}
	case KindDaemonSet:
		var d *appsv1.DaemonSet
		d, err = cl.client.AppsV1().DaemonSets(w.Namespace).Create(ctx, &appsv1.DaemonSet{
			ObjectMeta: meta(w.Name),
			Spec:       appsv1.DaemonSetSpec{Selector: selector, Template: podTemplate(w, labels, corev1.RestartPolicyAlways)},
		}, metav1.CreateOptions{})
		if err == nil {
			cl.owners[w.Key()] = ctrl("apps/v1", "DaemonSet", d.Name, d.UID)
		}
	case KindCronJob:
		var cj *batchv1.CronJob
		cj, err = cl.client.BatchV1().CronJobs(w.Namespace).Create(ctx, &batchv1.CronJob{
			ObjectMeta: meta(w.Name),
			Spec: batchv1.CronJobSpec{Schedule: "*/10 * * * *", JobTemplate: batchv1.JobTemplateSpec{
				Spec: batchv1.JobSpec{Template: podTemplate(w, labels, corev1.RestartPolicyOnFailure)},
			}},
		}, metav1.CreateOptions{})
		if err != nil {
			break
		}
		cronRef := ctrl("batch/v1", "CronJob", cj.Name, cj.UID)
		var owner metav1.OwnerReference
		owner, labels, err = cl.createJob(ctx, w, jobName(w), &cronRef)
		cl.owners[w.Key()] = owner
	case KindJob:
		var owner metav1.OwnerReference
		owner, labels, err = cl.createJob(ctx, w, w.Name, nil)
		cl.owners[w.Key()] = owner
	case KindPod:
		// A bare pod has no owner.
	}
	if err != nil {
		return fmt.Errorf("creating %s %s: %w", w.Kind, w.Key(), err)
	}
	cl.labels[w.Key()] = labels
	return nil
}

// createJob creates a Job (owned by owner when not nil) and returns the
// owner reference and labels of its pods. The API server generates the
// Job's selector from its UID, as for any Job without manualSelector.
func (cl *Cluster) createJob(ctx context.Context, w Workload, name string, owner *metav1.OwnerReference) (metav1.OwnerReference, map[string]string, error) {
	completions := int32(len(w.Nodes))
	job := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: w.Namespace, Labels: map[string]string{"app": w.Name}},
		Spec: batchv1.JobSpec{
			Parallelism: &completions, Completions: &completions,
			Template: podTemplate(w, map[string]string{"app": w.Name}, corev1.RestartPolicyOnFailure),
		},
	}
	if owner != nil {
		job.OwnerReferences = []metav1.OwnerReference{*owner}
	}
	created, err := cl.client.BatchV1().Jobs(w.Namespace).Create(ctx, job, metav1.CreateOptions{})
	if err != nil {
		return metav1.OwnerReference{}, nil, err
	}
	yes := true
	ref := metav1.OwnerReference{APIVersion: "batch/v1", Kind: "Job", Name: created.Name, UID: created.UID, Controller: &yes, BlockOwnerDeletion: &yes}
	return ref, created.Spec.Template.Labels, nil
}

// createPod creates pod name of w in slot s (spec.nodeName set, as the
// scheduler would) and sets it Running with the slot's IPs through
// pods/status, as the kubelet would.
func (cl *Cluster) createPod(ctx context.Context, s *slot, w Workload, name string) (*corev1.Pod, error) {
	restart := corev1.RestartPolicyAlways
	if w.Kind == KindJob || w.Kind == KindCronJob {
		restart = corev1.RestartPolicyOnFailure
	}
	tmpl := podTemplate(w, cl.labels[w.Key()], restart)
	zero := int64(0)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: w.Namespace, Labels: map[string]string{}},
		Spec:       tmpl.Spec,
	}
	for k, v := range tmpl.Labels {
		pod.Labels[k] = v
	}
	if w.Kind == KindStatefulSet {
		pod.Labels["statefulset.kubernetes.io/pod-name"] = name
	}
	if owner, ok := cl.owners[w.Key()]; ok {
		pod.OwnerReferences = []metav1.OwnerReference{owner}
	}
	pod.Spec.NodeName = s.node.Name
	pod.Spec.ServiceAccountName = w.ServiceAccount
	pod.Spec.TerminationGracePeriodSeconds = &zero
	created, err := cl.client.CoreV1().Pods(w.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("creating pod %s/%s: %w", w.Namespace, name, err)
	}
	now := metav1.Now()
	status := corev1.PodStatus{
		Phase:   corev1.PodRunning,
		HostIP:  s.node.IPv4.String(),
		HostIPs: []corev1.HostIP{{IP: s.node.IPv4.String()}, {IP: s.node.IPv6.String()}},
		PodIP:   s.ipv4.String(),
		PodIPs:  []corev1.PodIP{{IP: s.ipv4.String()}, {IP: s.ipv6.String()}},
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
		},
		StartTime: &now,
	}
	body, err := statusPatch(status)
	if err != nil {
		return nil, err
	}
	patched, err := cl.client.CoreV1().Pods(w.Namespace).Patch(ctx, created.Name, types.StrategicMergePatchType, body, metav1.PatchOptions{}, "status")
	if err != nil {
		return nil, fmt.Errorf("patching pods/status of %s/%s: %w", w.Namespace, created.Name, err)
	}
	return patched, nil
}

// Pod returns the pod now in slot: the name the pod was first created
// with, which for a pod with its own network namespace is also its
// testnet.Pod name. After ReplacePod the slot holds the new pod.
func (cl *Cluster) Pod(slot string) *corev1.Pod {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if s, ok := cl.slots[slot]; ok {
		return s.pod.DeepCopy()
	}
	return nil
}

// WorkloadOf returns the workload of the pod now in slot.
func (cl *Cluster) WorkloadOf(slot string) (Workload, bool) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	s, ok := cl.slots[slot]
	if !ok {
		return Workload{}, false
	}
	return s.workload, true
}

// Slots returns the slot names, sorted.
func (cl *Cluster) Slots() []string {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	out := make([]string, 0, len(cl.slots))
	for name := range cl.slots {
		out = append(out, name)
	}
	sort.Strings(out)
	return out
}

// PodOn returns the pod now running for workload ("namespace/name") on
// node, or nil; with several, the first.
func (cl *Cluster) PodOn(workload, node string) *corev1.Pod {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	var best *slot
	for _, s := range cl.slots {
		if s.workload.Key() == workload && s.node.Name == node && (best == nil || s.name < best.name) {
			best = s
		}
	}
	if best == nil {
		return nil
	}
	return best.pod.DeepCopy()
}

// Node returns the Node object created for name, or nil.
func (cl *Cluster) Node(name string) *corev1.Node {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if n, ok := cl.nodes[name]; ok {
		return n.DeepCopy()
	}
	return nil
}

// ReplacePod deletes the pod in slot and creates another one on the same
// node with the same IPs, the way an IP is reused when a pod is replaced.
// workload is the new pod's workload as "namespace/name" (Workload.Key);
// empty keeps the old one (a Deployment's pod gets a new name, a
// StatefulSet's the same name with a new UID). It returns the old and the
// new pod.
func (cl *Cluster) ReplacePod(ctx context.Context, slotName, workload string) (old, replacement *corev1.Pod, err error) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	s, ok := cl.slots[slotName]
	if !ok {
		return nil, nil, fmt.Errorf("replacing pod: no slot %q", slotName)
	}
	w := s.workload
	if workload != "" && workload != w.Key() {
		found := false
		for _, cand := range cl.Spec.Workloads {
			if cand.Key() == workload {
				w, found = cand, true
			}
		}
		if !found {
			return nil, nil, fmt.Errorf("replacing pod %s: no workload %q in the spec", slotName, workload)
		}
		if w.HostNetwork != s.hostNet {
			return nil, nil, fmt.Errorf("replacing pod %s: workload %q differs in host networking", slotName, workload)
		}
	}
	old = s.pod
	zero := int64(0)
	uid := old.UID
	err = cl.client.CoreV1().Pods(old.Namespace).Delete(ctx, old.Name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &uid},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("deleting pod %s/%s: %w", old.Namespace, old.Name, err)
	}
	// With a zero grace period and no kubelet the object goes at once;
	// make sure, since a StatefulSet's replacement reuses the name.
	if _, err := cl.client.CoreV1().Pods(old.Namespace).Get(ctx, old.Name, metav1.GetOptions{}); err == nil {
		return nil, nil, fmt.Errorf("pod %s/%s still exists after deletion", old.Namespace, old.Name)
	} else if !apierrors.IsNotFound(err) {
		return nil, nil, fmt.Errorf("checking that pod %s/%s is gone: %w", old.Namespace, old.Name, err)
	}
	cl.gen++
	index := s.index
	if w.Key() != s.workload.Key() {
		// Another workload's pod: an index past its own pods.
		index = len(w.Nodes) + cl.gen
	}
	replacement, err = cl.createPod(ctx, s, w, podName(w, index, cl.gen))
	if err != nil {
		return nil, nil, err
	}
	s.pod, s.workload, s.index = replacement, w, index
	return old, replacement.DeepCopy(), nil
}
