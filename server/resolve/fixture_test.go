package resolve

import (
	"context"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	metadatafake "k8s.io/client-go/metadata/fake"
	k8stesting "k8s.io/client-go/testing"
)

// The Kubernetes API is faked with client-go's fake clientsets: a real API
// server cannot be started inside a unit test. The informers, transforms and
// event handlers under test are the real ones.

// fixture runs a Resolver against fake clientsets and lets a test move the
// informer clock and wait for each change to be handled.
type fixture struct {
	t    *testing.T
	kube *fake.Clientset
	md   *metadatafake.FakeMetadataClient
	r    *Resolver

	mu  sync.Mutex
	now time.Time

	watchMu sync.Mutex
	watches map[string]int // started watches per resource
}

// base is the informer clock at the start of every test.
var base = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

type fixtureOpts struct {
	cfg    Config
	objs   []runtime.Object // pods and nodes present before Run
	owners []runtime.Object // ReplicaSet/Job metadata; nil: no metadata client
	// forbidOwners makes listing owners fail like a missing RBAC rule.
	forbidOwners bool
	// forbidServices does the same to listing Services.
	forbidServices bool
}

func newFixture(t *testing.T, o fixtureOpts) *fixture {
	t.Helper()
	f := &fixture{t: t, now: base, watches: map[string]int{}}
	f.kube = fake.NewClientset(o.objs...)
	f.kube.PrependWatchReactor("*", f.watchReactor(f.kube.Tracker()))
	cfg := o.cfg
	if cfg.ReleasedIPTTL == 0 {
		cfg.ReleasedIPTTL = 2 * time.Minute
	}
	if cfg.ReleasedIPCacheSize == 0 {
		cfg.ReleasedIPCacheSize = 128
	}
	wantWatches := []string{"nodes", "pods", "services", "endpointslices"}
	if o.forbidServices {
		f.kube.PrependReactor("list", "services", func(a k8stesting.Action) (bool, runtime.Object, error) {
			return true, nil, errForbidden(a.GetResource().Resource)
		})
		wantWatches = wantWatches[:2]
	}
	if o.owners != nil {
		scheme := metadatafake.NewTestScheme()
		if err := metav1.AddMetaToScheme(scheme); err != nil {
			t.Fatal(err)
		}
		f.md = metadatafake.NewSimpleMetadataClient(scheme, o.owners...)
		f.md.PrependWatchReactor("*", f.watchReactor(f.md.Tracker()))
		if o.forbidOwners {
			f.md.PrependReactor("list", "*", func(a k8stesting.Action) (bool, runtime.Object, error) {
				return true, nil, errForbidden(a.GetResource().Resource)
			})
		} else {
			wantWatches = append(wantWatches, "replicasets", "jobs")
		}
		cfg.Metadata = f.md
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	r, err := New(cfg, f.kube, log)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	r.now = f.clock
	f.r = r

	runResolver(t, r)
	f.waitFor("informers synced", r.HasSynced)
	// The fake clientsets do not replay events from a resourceVersion:
	// changes made before the watches are open would be lost.
	f.waitFor("watches open", func() bool {
		f.watchMu.Lock()
		defer f.watchMu.Unlock()
		for _, res := range wantWatches {
			if f.watches[res] == 0 {
				return false
			}
		}
		return true
	})
	return f
}

func errForbidden(res string) error {
	return &apiStatusError{metav1.Status{Status: metav1.StatusFailure, Reason: metav1.StatusReasonForbidden,
		Code: 403, Message: res + " is forbidden"}}
}

type apiStatusError struct{ s metav1.Status }

func (e *apiStatusError) Error() string         { return e.s.Message }
func (e *apiStatusError) Status() metav1.Status { return e.s }

// watchReactor opens the watch on the tracker itself and records it, so the
// fixture knows when events will no longer be missed.
func (f *fixture) watchReactor(tr k8stesting.ObjectTracker) k8stesting.WatchReactionFunc {
	return func(action k8stesting.Action) (bool, watch.Interface, error) {
		var opts metav1.ListOptions
		if wa, ok := action.(k8stesting.WatchActionImpl); ok {
			opts = wa.ListOptions
		}
		w, err := tr.Watch(action.GetResource(), action.GetNamespace(), opts)
		if err != nil {
			return false, nil, err
		}
		f.watchMu.Lock()
		f.watches[action.GetResource().Resource]++
		f.watchMu.Unlock()
		return true, w, nil
	}
}

func (f *fixture) clock() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fixture) setClock(t time.Time) {
	f.mu.Lock()
	f.now = t
	f.mu.Unlock()
}

// waitFor polls cond; the deadline only guards against a hung test.
func (f *fixture) waitFor(what string, cond func() bool) {
	f.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			f.t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// apply runs one API change at informer time at and waits until the
// resolver has handled the event it causes.
func (f *fixture) apply(at time.Time, what string, change func(ctx context.Context) error) {
	f.t.Helper()
	f.setClock(at)
	n := f.r.events.Load()
	if err := change(context.Background()); err != nil {
		f.t.Fatalf("%s: %v", what, err)
	}
	f.waitFor(what, func() bool { return f.r.events.Load() > n })
}

func (f *fixture) createPod(at time.Time, p *corev1.Pod) {
	f.apply(at, "create pod "+p.Name, func(ctx context.Context) error {
		_, err := f.kube.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
		return err
	})
}

func (f *fixture) updatePod(at time.Time, p *corev1.Pod) {
	f.apply(at, "update pod "+p.Name, func(ctx context.Context) error {
		_, err := f.kube.CoreV1().Pods(p.Namespace).Update(ctx, p, metav1.UpdateOptions{})
		return err
	})
}

func (f *fixture) deletePod(at time.Time, ns, name string) {
	f.apply(at, "delete pod "+name, func(ctx context.Context) error {
		return f.kube.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{})
	})
}

func (f *fixture) createNode(at time.Time, n *corev1.Node) {
	f.apply(at, "create node "+n.Name, func(ctx context.Context) error {
		_, err := f.kube.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
		return err
	})
}

func (f *fixture) updateNode(at time.Time, n *corev1.Node) {
	f.apply(at, "update node "+n.Name, func(ctx context.Context) error {
		_, err := f.kube.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
		return err
	})
}

func (f *fixture) createOwner(at time.Time, m *metav1.PartialObjectMetadata) {
	gvr := gvrReplicaSets
	if m.Kind == kindJob {
		gvr = gvrJobs
	}
	f.apply(at, "create owner "+m.Name, func(context.Context) error {
		_, err := f.md.Resource(gvr).Namespace(m.Namespace).(metadatafake.MetadataClient).CreateFake(m, metav1.CreateOptions{})
		return err
	})
}

// Object builders.

func node(name, zone, region string, addrs ...string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID("uid-" + name), Labels: map[string]string{
		"kubernetes.io/hostname": name, // dropped by the transform
	}}}
	if zone != "" {
		n.Labels[LabelZone] = zone
	}
	if region != "" {
		n.Labels[LabelRegion] = region
	}
	for _, a := range addrs {
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: a})
	}
	n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeHostName, Address: name})
	return n
}

type podOpt func(*corev1.Pod)

func pod(ns, name, nodeName string, ips []string, opts ...podOpt) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + ns + "-" + name)},
		Spec:       corev1.PodSpec{NodeName: nodeName, Containers: []corev1.Container{{Name: "c", Image: "img"}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	if len(ips) > 0 {
		p.Status.PodIP = ips[0]
	}
	for _, o := range opts {
		o(p)
	}
	return p
}

func ownedBy(kind, name string) podOpt {
	return func(p *corev1.Pod) {
		p.OwnerReferences = append(p.OwnerReferences, metav1.OwnerReference{APIVersion: "v1", Kind: kind, Name: name,
			UID: types.UID("uid-" + name), Controller: ptrTrue()})
	}
}

func labels(kv ...string) podOpt {
	return func(p *corev1.Pod) {
		if p.Labels == nil {
			p.Labels = map[string]string{}
		}
		for i := 0; i+1 < len(kv); i += 2 {
			p.Labels[kv[i]] = kv[i+1]
		}
	}
}

func hostNetwork(p *corev1.Pod) { p.Spec.HostNetwork = true }

func phase(ph corev1.PodPhase) podOpt { return func(p *corev1.Pod) { p.Status.Phase = ph } }

func uid(u string) podOpt { return func(p *corev1.Pod) { p.UID = types.UID(u) } }

func ownerMeta(kind, ns, name, ctrlKind, ctrlName string) *metav1.PartialObjectMetadata {
	apiVersion := "apps/v1"
	if kind == kindJob {
		apiVersion = "batch/v1"
	}
	m := &metav1.PartialObjectMetadata{
		TypeMeta:   metav1.TypeMeta{APIVersion: apiVersion, Kind: kind},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + name)},
	}
	if ctrlKind != "" {
		m.OwnerReferences = []metav1.OwnerReference{{Kind: ctrlKind, Name: ctrlName, UID: types.UID("uid-" + ctrlName), Controller: ptrTrue()}}
	}
	return m
}

func ptrTrue() *bool { b := true; return &b }

// Expected endpoints, written out as the contract states them.

func podEP(ns, name, workload, workloadKind, nodeName, zone, region string) *Endpoint {
	return &Endpoint{Kind: KindPod, Namespace: ns, Pod: name, Workload: workload, WorkloadKind: workloadKind,
		Node: nodeName, Zone: zone, Region: region}
}

func nodeEP(name, zone, region string) *Endpoint {
	return &Endpoint{Kind: KindNode, Workload: name, WorkloadKind: "Node", Node: name, Zone: zone, Region: region}
}

func unknownEP(reason string) *Endpoint {
	return &Endpoint{Kind: KindUnknown, Workload: "unknown", WorkloadKind: "Unknown", Zone: "unknown",
		Region: "unknown", Reason: reason}
}

func unknownPodEP(reason, ns, name, nodeName string) *Endpoint {
	ep := unknownEP(reason)
	ep.Namespace, ep.Pod, ep.Node = ns, name, nodeName
	return ep
}

func unknownNodeEP(reason, nodeName string) *Endpoint {
	ep := unknownEP(reason)
	ep.Node = nodeName
	return ep
}

func staticEP(name, zone, region string) *Endpoint {
	return &Endpoint{Kind: KindStatic, Workload: name, WorkloadKind: "Static", Zone: zone, Region: region}
}

var externalEP = &Endpoint{Kind: KindExternal, Workload: "external", WorkloadKind: "External",
	Zone: "external", Region: "external"}

// writeFile writes a test file into the test's temp dir.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := t.TempDir() + "/" + name
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func newEmptyClient() *fake.Clientset { return fake.NewClientset() }

// runResolver runs r until the test ends, and fails the test if Run
// returns an error.
func runResolver(t *testing.T, r *Resolver) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}
