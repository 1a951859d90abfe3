package scale

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/kubezonnet/kubezonnet/internal/wire"
	"github.com/kubezonnet/kubezonnet/testenv"
)

// Namespace holds the simulated pods.
const Namespace = "scale"

// createWorkers is how many pods are created at once: enough to keep the
// API server busy on two cores.
const createWorkers = 32

// slot is a place a pod runs: a node and an address. Churn replaces the pod
// in a slot, keeping the address.
type slot struct {
	node int
	ip   netip.Addr
	// pod and uid name the pod that holds ip now; vacant is set while the
	// pod is being replaced, when no pod holds the address.
	pod    string
	uid    types.UID
	vacant bool
	gen    int
	// peers are the slots this pod sends to: a pod talks to a few peers,
	// not to every pod of the cluster.
	peers []int
}

// world is the simulated cluster: the slots, who holds each address now,
// and which pods were deleted and when.
type world struct {
	opts   Options
	client kubernetes.Interface

	mu      sync.RWMutex
	slots   []slot
	deleted map[string]time.Time // pod name -> deletion

	// released holds, per node, the addresses whose pod was replaced
	// since that node's agent last generated a batch: what a real agent
	// sees when a pod's host route goes away (wire.Batch.Released).
	relMu    sync.Mutex
	released map[int][]wire.Release
	// onRelease tells a node's agent of a release (agent.released),
	// for the nodes that have one.
	onRelease map[int]func()

	// traceMu guards what explains a misattribution (Result.Traces):
	// per release (address and time), the pod that released it and when
	// the request that reported it was sent and acknowledged (if one
	// was); per destination pod, the first acknowledged batch with flows
	// to it.
	traceMu  sync.Mutex
	releases map[wire.Release]*releaseTrace
	firstTo  map[string]sendTrace
}

// releaseTrace is a release and its report.
type releaseTrace struct {
	pod  string
	at   time.Time
	how  string // "batch" or "notice": the request acknowledged first
	sent time.Time
	// reported is when the server acknowledged it: zero until then.
	reported time.Time
}

// sendTrace is a batch: its node, when it was sent and when the server
// acknowledged it.
type sendTrace struct {
	node        int
	sent, acked time.Time
}

// trace explains how pod, credited excess bytes as the destination, came
// to be: the release of its address (or of its predecessor's), when the
// report was sent and acknowledged, and when the first batch to its
// successor was, in milliseconds from the release: a report acknowledged
// after such a batch was sent may have reached the server after it.
func (w *world) trace(pod string, excess float64) string {
	w.traceMu.Lock()
	defer w.traceMu.Unlock()
	var rel *releaseTrace
	for _, t := range w.releases {
		if t.pod == pod {
			rel = t
		}
	}
	if rel == nil {
		return fmt.Sprintf("%s: %.0f bytes over, no release of its address", pod, excess)
	}
	ms := func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return fmt.Sprintf("%+.1f ms", float64(t.Sub(rel.at).Microseconds())/1000)
	}
	node, k, gen := podNameParts(pod)
	if node < 0 {
		return fmt.Sprintf("%s: %.0f bytes over, not a simulated pod", pod, excess)
	}
	next := podName(node, k, gen+1)
	first := w.firstTo[next]
	report := "not reported"
	if !rel.reported.IsZero() {
		report = fmt.Sprintf("reported by %s sent %s, acknowledged %s", rel.how, ms(rel.sent), ms(rel.reported))
	}
	return fmt.Sprintf("%s: %.0f bytes over; released at %s, %s; %s first sent flows by %s at %s, acknowledged %s",
		pod, excess, rel.at.Format("15:04:05.000"), report, next, nodeName(first.node), ms(first.sent), ms(first.acked))
}

// noteReported records that a request (how) reporting rels, sent at
// sent, was acknowledged at ack.
func (w *world) noteReported(rels []wire.Release, how string, sent, ack time.Time) {
	w.traceMu.Lock()
	defer w.traceMu.Unlock()
	for _, r := range rels {
		if t := w.releases[r]; t != nil && t.reported.IsZero() {
			t.how, t.sent, t.reported = how, sent, ack
		}
	}
}

// noteSent records the first acknowledged batch with flows to each
// destination in pods, sent by node at sent and acknowledged at acked
// (trace reads successors').
func (w *world) noteSent(pods []pair, node int, sent, acked time.Time) {
	w.traceMu.Lock()
	defer w.traceMu.Unlock()
	for _, p := range pods {
		if f, ok := w.firstTo[p.dst]; !ok || sent.Before(f.sent) {
			w.firstTo[p.dst] = sendTrace{node, sent, acked}
		}
	}
}

// zoneOf names node n's zone.
func (w *world) zoneOf(node int) string { return fmt.Sprintf("zone-%c", 'a'+node%w.opts.Zones) }

// nodeName names node n.
func nodeName(n int) string { return fmt.Sprintf("node-%04d", n) }

// podCIDR is node n's pod range, 10.64.0.0/10 split into /24s: room for
// 16,384 nodes of 250 pods.
func podCIDR(n int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(64 + n>>8), byte(n), 0}), 24)
}

func newWorld(opts Options, c kubernetes.Interface, rng *rand.Rand) *world {
	w := &world{opts: opts, client: c, deleted: map[string]time.Time{}, released: map[int][]wire.Release{}, onRelease: map[int]func(){},
		releases: map[wire.Release]*releaseTrace{}, firstTo: map[string]sendTrace{}}
	total := opts.Nodes * opts.PodsPerNode
	w.slots = make([]slot, total)
	for i := range w.slots {
		n, k := i/opts.PodsPerNode, i%opts.PodsPerNode
		base := podCIDR(n).Addr().As4()
		base[3] = byte(2 + k)
		s := &w.slots[i]
		s.node, s.ip = n, netip.AddrFrom4(base)
		s.pod = podName(n, k, 0)
		for len(s.peers) < min(opts.PeersPerPod, total-1) {
			if p := rng.IntN(total); p != i {
				s.peers = append(s.peers, p)
			}
		}
	}
	return w
}

func podName(node, k, gen int) string { return fmt.Sprintf("app-%04d-%03d-g%d", node, k, gen) }

// create creates the Nodes, the namespace and every slot's first pod.
func (w *world) create(ctx context.Context) error {
	for n := range w.opts.Nodes {
		node := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: nodeName(n), Labels: map[string]string{
				testenv.LabelZone:        w.zoneOf(n),
				testenv.LabelRegion:      "region-1",
				"kubernetes.io/hostname": nodeName(n),
			}},
			Spec: corev1.NodeSpec{PodCIDR: podCIDR(n).String(), PodCIDRs: []string{podCIDR(n).String()}},
		}
		if _, err := w.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating node %s: %w", node.Name, err)
		}
	}
	work := make(chan int)
	errs := make(chan error, createWorkers)
	var wg sync.WaitGroup
	for range createWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				s := &w.slots[i]
				uid, err := w.createPod(ctx, s.node, s.pod, s.ip)
				if err != nil {
					errs <- err
					return
				}
				s.uid = uid
			}
		}()
	}
	var err error
feed:
	for i := range w.slots {
		select {
		case work <- i:
		case err = <-errs:
			break feed
		}
	}
	close(work)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return err
}

// createPod creates a pod on node (spec.nodeName set, as the scheduler
// would) and sets it Running with ip through pods/status, as the kubelet
// would.
func (w *world) createPod(ctx context.Context, node int, name string, ip netip.Addr) (types.UID, error) {
	zero := int64(0)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: Namespace, Labels: map[string]string{"app": "app"}},
		Spec: corev1.PodSpec{
			NodeName:                      nodeName(node),
			TerminationGracePeriodSeconds: &zero,
			// Nothing pulls it: no kubelet runs.
			Containers: []corev1.Container{{Name: "main", Image: "registry.invalid/kubezonnet-scale/app:v1"}},
		},
	}
	created, err := w.client.CoreV1().Pods(Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("creating pod %s: %w", name, err)
	}
	now := metav1.Now()
	status := corev1.PodStatus{
		Phase:  corev1.PodRunning,
		PodIP:  ip.String(),
		PodIPs: []corev1.PodIP{{IP: ip.String()}},
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
		},
		StartTime: &now,
	}
	body, err := json.Marshal(map[string]any{"status": status})
	if err != nil {
		return "", fmt.Errorf("encoding the status of pod %s: %w", name, err)
	}
	if _, err := w.client.CoreV1().Pods(Namespace).Patch(ctx, name, types.StrategicMergePatchType, body, metav1.PatchOptions{}, "status"); err != nil {
		return "", fmt.Errorf("patching pods/status of %s: %w", name, err)
	}
	return created.UID, nil
}

// replace deletes the pod of slot i and creates its successor with the
// same address. No flow is generated for the address in between: the
// slot is vacant from before the deletion until the successor is Running
// in the API server. The node's agent learns of the release as the slot
// turns vacant, as a real agent sees the pod's sandbox go (its host
// route deleted) before the kubelet deletes the pod in the API server.
func (w *world) replace(ctx context.Context, i int) error {
	w.mu.Lock()
	s := &w.slots[i]
	s.vacant = true
	r := wire.Release{Addr: s.ip, Time: time.Now()}
	w.traceMu.Lock()
	w.releases[r] = &releaseTrace{pod: s.pod, at: r.Time}
	w.traceMu.Unlock()
	if !w.opts.NoReleases {
		w.relMu.Lock()
		// Only a node with an agent reports.
		if tell := w.onRelease[s.node]; tell != nil {
			w.released[s.node] = append(w.released[s.node], r)
			tell()
		}
		w.relMu.Unlock()
	}
	old, uid := s.pod, s.uid
	s.gen++
	next := podName(s.node, i%w.opts.PodsPerNode, s.gen)
	node, ip := s.node, s.ip
	w.mu.Unlock()

	zero := int64(0)
	err := w.client.CoreV1().Pods(Namespace).Delete(ctx, old, metav1.DeleteOptions{
		GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &uid},
	})
	if err != nil {
		return fmt.Errorf("deleting pod %s: %w", old, err)
	}
	w.mu.Lock()
	w.deleted[old] = time.Now()
	w.mu.Unlock()
	newUID, err := w.createPod(ctx, node, next, ip)
	if err != nil {
		return err
	}
	w.mu.Lock()
	s.pod, s.uid, s.vacant = next, newUID, false
	w.mu.Unlock()
	return nil
}

// churn replaces a random pod perSecond times a second until stop is
// closed, and returns how many it replaced. The n-th replacement is due
// n/perSecond after the start: one that took longer than its share (three
// API calls in a row) is made up by starting the next ones at once, so
// the rate holds on average as far as the API server keeps up.
func (w *world) churn(ctx context.Context, perSecond float64, rng *rand.Rand, stop <-chan struct{}) (int, error) {
	if perSecond <= 0 {
		return 0, nil
	}
	start := time.Now()
	timer := time.NewTimer(0)
	defer timer.Stop()
	done := 0
	for {
		timer.Reset(time.Until(start.Add(time.Duration(float64(done+1) / perSecond * float64(time.Second)))))
		select {
		case <-ctx.Done():
			return done, ctx.Err()
		case <-stop:
			return done, nil
		case <-timer.C:
		}
		if err := w.replace(ctx, rng.IntN(len(w.slots))); err != nil {
			return done, err
		}
		done++
	}
}

// takeReleased returns the addresses released on node since the last
// call. Callers hold mu (read), so that no release happens meanwhile.
func (w *world) takeReleased(node int) []wire.Release {
	w.relMu.Lock()
	defer w.relMu.Unlock()
	r := w.released[node]
	delete(w.released, node)
	return r
}

// pendingReleases returns a copy of the releases on node that no batch
// took yet.
func (w *world) pendingReleases(node int) []wire.Release {
	w.relMu.Lock()
	defer w.relMu.Unlock()
	return slices.Clone(w.released[node])
}

// hasPendingReleases reports whether node has releases no batch took yet.
func (w *world) hasPendingReleases(node int) bool {
	w.relMu.Lock()
	defer w.relMu.Unlock()
	return len(w.released[node]) > 0
}

// nodeOfPod returns the node whose pod range holds addr (see podCIDR).
func (w *world) nodeOfPod(addr netip.Addr) int {
	b := addr.As4()
	return int(b[1]-64)<<8 | int(b[2])
}

// deletedPods returns the names of the pods deleted so far.
func (w *world) deletedPods() map[string]bool {
	w.mu.RLock()
	defer w.mu.RUnlock()
	out := make(map[string]bool, len(w.deleted))
	for name := range w.deleted {
		out[name] = true
	}
	return out
}

// genOfName returns the generation of a pod from its name (see podName):
// 0 for the pods created at the start, -1 for a name not of a pod.
func (w *world) genOfName(pod string) int {
	_, _, gen := podNameParts(pod)
	return gen
}

// nodeOfName returns the node of a pod from its name (see podName).
func (w *world) nodeOfName(pod string) int {
	n, _, _ := podNameParts(pod)
	return n
}

// zoneOfName returns the zone of a pod from its name (see podName).
func (w *world) zoneOfName(pod string) string { return w.zoneOf(w.nodeOfName(pod)) }

// podNameParts returns the node, the pod's index on it and the
// generation in a pod's name (see podName), -1 each for a name not of a
// pod.
func podNameParts(pod string) (node, k, gen int) {
	if _, err := fmt.Sscanf(pod, "app-%d-%d-g%d", &node, &k, &gen); err != nil {
		return -1, -1, -1
	}
	return node, k, gen
}
