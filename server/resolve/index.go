package resolve

import (
	"math"
	"net/netip"
	"slices"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
)

// maxHoldersPerIP bounds the released holders remembered for one address.
// More than a few owners of one IP inside one --released-ip-ttl would mean
// pods churning every few seconds; the oldest are forgotten first.
const maxHoldersPerIP = 4

// index maps addresses to endpoints. Informer handlers write it under mu;
// Resolve reads it under mu.RLock. Endpoints are precomputed per pod and per
// node whenever something they depend on changes (pod, node, ReplicaSet or
// Job metadata), so a lookup is one map probe: a single map holds pod
// addresses, host addresses and a marker for addresses with released
// history, so an address nobody claims costs no LRU probe.
type index struct {
	mu sync.RWMutex

	pods    map[string]*podState // by namespace/name
	nodes   map[string]*nodeState
	addrs   map[addrKey]addrSlot
	byOwner map[ownerKey]map[*podState]struct{}

	// released remembers, per address, the pods that held it until
	// recently (oldest first). Values are never modified once stored, so
	// readers may use them without mu.
	released *lru.Cache[netip.Addr, []heldBy]
	// cuts remembers, per address, the last release its node reported
	// (see cut.go), within the same bound as released.
	cuts *lru.Cache[netip.Addr, cut]
	ttl  time.Duration
	// reuse is Config.ReuseWindow in nanoseconds.
	reuse int64

	podLabels []string
	owners    *ownerStore
}

// podState is the index's view of one pod.
type podState struct {
	namespace, name string
	uid             types.UID
	node            *nodeState
	hostNetwork     bool
	ips             []netip.Addr // addresses this pod holds now
	owner           podOwner
	via             *ownerKey // ReplicaSet or Job its workload name depends on
	labels          []string  // values of the requested pod labels
	ep              *Endpoint
}

// nodeState is the index's view of one node; it also exists, with
// known=false, while pods reference a node the informer has not delivered.
type nodeState struct {
	name         string
	known        bool
	zone, region string
	addrs        []netip.Addr
	pods         map[*podState]struct{}
	ep           *Endpoint
}

// addrKey is the map key of an address: its 16-byte form, which leaves out
// the zone handle a netip.Addr carries (addresses are normalized first, so
// IPv4 and IPv6 keys never collide), one map for both families.
type addrKey [16]byte

// slot returns the slot of a normalized address.
func (ix *index) slot(ip netip.Addr) (addrSlot, bool) {
	s, ok := ix.addrs[ip.As16()]
	return s, ok
}

func (ix *index) setSlot(ip netip.Addr, s addrSlot) { ix.addrs[ip.As16()] = s }

func (ix *index) deleteSlot(ip netip.Addr) { delete(ix.addrs, ip.As16()) }

// addrSlot is everything the index knows about one address.
type addrSlot struct {
	// ep is the endpoint of the pod holding the address on the pod
	// network (copied from the pod to spare Resolve a pointer chase), and
	// since the time the informer handler saw the assignment, in Unix
	// nanoseconds (heldSinceStart for pods that existed when the resolver
	// started); an int64 rather than a time.Time keeps a slot, with its
	// key, within one 64-byte cache line.
	ep    *Endpoint
	since int64
	pod   *podState
	// node is set for host addresses: the node's own address (nodeAddr)
	// and/or the address of hostPods host-network pods on it.
	node     *nodeState
	nodeAddr bool
	hostPods int32
	// released says the released LRU holds past holders of the address.
	released bool
	// cut says the cuts LRU holds a release its node reported.
	cut bool
}

// empty reports a slot that no longer says anything.
func (s *addrSlot) empty() bool {
	return s.pod == nil && s.node == nil && !s.released && !s.cut
}

// heldBy is one past holder of a pod address.
type heldBy = tenure[*Endpoint]

// heldSinceStart is the "since" of addresses the initial list delivered:
// earlier than any flow.
const heldSinceStart = math.MinInt64

func newIndex(cacheSize int, ttl, reuse time.Duration, podLabels []string) (*index, error) {
	ix := &index{
		reuse:     int64(reuse),
		pods:      make(map[string]*podState),
		nodes:     make(map[string]*nodeState),
		addrs:     make(map[addrKey]addrSlot),
		byOwner:   make(map[ownerKey]map[*podState]struct{}),
		ttl:       ttl,
		podLabels: podLabels,
	}
	// Evictions happen only inside released.Add, which runs under mu.
	released, err := lru.NewWithEvict(cacheSize, func(ip netip.Addr, _ []heldBy) {
		ix.updateSlot(ip, func(s *addrSlot) { s.released = false })
	})
	if err != nil {
		return nil, err
	}
	ix.released = released
	cuts, err := lru.NewWithEvict(cacheSize, func(ip netip.Addr, _ cut) {
		ix.updateSlot(ip, func(s *addrSlot) { s.cut = false })
	})
	if err != nil {
		return nil, err
	}
	ix.cuts = cuts
	return ix, nil
}

// updateSlot applies change to the slot of ip (creating it), and drops the
// slot when it is empty afterwards. Callers hold mu.
func (ix *index) updateSlot(ip netip.Addr, change func(s *addrSlot)) {
	s, _ := ix.slot(ip)
	change(&s)
	if s.empty() {
		ix.deleteSlot(ip)
	} else {
		ix.setSlot(ip, s)
	}
}

// lookupSlot is the hot path: the endpoint ip (already normalized) had at
// time at, or nil when no pod, node or recently released pod claims it,
// and the address's slot (zero when the index knows nothing of it).
func (ix *index) lookupSlot(ip netip.Addr, at time.Time) (*Endpoint, addrSlot) {
	ix.mu.RLock()
	s, ok := ix.slot(ip)
	if !ok {
		ix.mu.RUnlock()
		return nil, s
	}
	ep := s.ep
	if ep == nil && s.node != nil {
		ep = s.node.ep
	}
	ix.mu.RUnlock()
	if s.released && (ep == nil || at.UnixNano() < s.since) {
		// No holder now, or observed before the current holder got the
		// address: an earlier holder, if one is remembered.
		var cur *Endpoint
		if s.pod != nil {
			cur = ep
		}
		if old := ix.formerHolder(ip, at, cur, s.since); old != nil {
			return old, s
		}
	}
	return ep, s
}

// formerHolder picks the holder of ip at time at among its released
// holders and cur, its holder now (nil for none), seen since curSince
// (holderAt, with the TTL as the grace of a released holder).
func (ix *index) formerHolder(ip netip.Addr, at time.Time, cur *Endpoint, curSince int64) *Endpoint {
	hist, _ := ix.released.Peek(ip)
	return holderAt(hist, cur, curSince, at.UnixNano(), ix.reuse, int64(ix.ttl))
}

// awaitsHolder reports whether a flow of ip at time at may belong to a
// holder the informer has not shown yet: the address has no pod now, its
// last holder released it before at, and less than ReuseWindow ago (now).
// Such a flow would go to the released pod, and a moment later to its
// successor.
// s is the address's slot, as lookupSlot returned it, with released
// history.
func (ix *index) awaitsHolder(ip netip.Addr, s *addrSlot, at, now time.Time) bool {
	if s.pod != nil || s.node != nil {
		return false
	}
	hist, ok := ix.released.Peek(ip)
	if !ok || len(hist) == 0 {
		return false
	}
	last := &hist[len(hist)-1]
	return at.UnixNano() > last.until && now.UnixNano() < last.until+ix.reuse
}

// upsertPod applies an added or updated pod. initial marks pods of the
// informer's first list, whose addresses count as held since forever.
func (ix *index) upsertPod(p *corev1.Pod, now time.Time, initial bool) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	key := p.Namespace + "/" + p.Name
	st := ix.pods[key]
	if st != nil && st.uid != p.UID {
		// Same name, new pod (delete and create folded into one update).
		ix.removePodLocked(st, now)
		st = nil
	}
	if st == nil {
		st = &podState{namespace: p.Namespace, name: p.Name, uid: p.UID}
		ix.pods[key] = st
	}

	// Addresses the pod should hold now. A pod in a terminal phase has
	// given its addresses back to the CNI even though the object remains.
	var want []netip.Addr
	if p.Spec.NodeName != "" && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
		want = podAddrs(p)
	}
	// Node or host-network changes never happen to a real pod, but if the
	// object says so, release everything and claim again under the new view.
	if (st.node != nil && st.node.name != p.Spec.NodeName) || st.hostNetwork != p.Spec.HostNetwork {
		ix.releaseAllLocked(st, now)
	}
	for _, ip := range st.ips {
		if !slices.Contains(want, ip) {
			ix.releaseLocked(st, ip, now)
		}
	}
	if st.node == nil || st.node.name != p.Spec.NodeName {
		ix.detachNodeLocked(st)
		if p.Spec.NodeName != "" {
			st.node = ix.nodeLocked(p.Spec.NodeName)
			st.node.pods[st] = struct{}{}
		}
	}
	st.hostNetwork = p.Spec.HostNetwork

	st.owner = ownerOf(p)
	st.labels = ix.labelValues(p.Labels, st.labels)
	ix.refreshPodLocked(st)

	since := now.UnixNano()
	if initial {
		since = heldSinceStart
	}
	held := st.ips[:0:0]
	for _, ip := range st.ips {
		if slices.Contains(want, ip) {
			held = append(held, ip)
		}
	}
	for _, ip := range want {
		if !slices.Contains(held, ip) {
			ix.claimLocked(st, ip, since, now)
			held = append(held, ip)
		}
	}
	st.ips = held
}

// deletePod applies a deleted pod; its addresses go to the released LRU.
func (ix *index) deletePod(namespace, name string, uid types.UID, now time.Time) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if st := ix.pods[namespace+"/"+name]; st != nil && (uid == "" || st.uid == uid) {
		ix.removePodLocked(st, now)
	}
}

func (ix *index) removePodLocked(st *podState, now time.Time) {
	ix.releaseAllLocked(st, now)
	ix.detachNodeLocked(st)
	ix.setOwnerLocked(st, nil)
	delete(ix.pods, st.namespace+"/"+st.name)
}

func (ix *index) releaseAllLocked(st *podState, now time.Time) {
	for _, ip := range st.ips {
		ix.releaseLocked(st, ip, now)
	}
	st.ips = nil
}

// claimLocked makes st the holder of ip. A pod-network address still held
// by another pod (whose deletion the informer has not delivered yet) is
// taken from it and remembered as released now.
func (ix *index) claimLocked(st *podState, ip netip.Addr, since int64, now time.Time) {
	if st.hostNetwork {
		ix.updateSlot(ip, func(s *addrSlot) {
			s.node = st.node
			s.hostPods++
		})
		return
	}
	if prev, _ := ix.slot(ip); prev.pod != nil && prev.pod != st {
		ix.remember(ip, heldBy{holder: prev.ep, since: prev.since, until: now.UnixNano()})
		prev.pod.ips = slices.DeleteFunc(prev.pod.ips, func(a netip.Addr) bool { return a == ip })
	}
	ix.updateSlot(ip, func(s *addrSlot) { s.ep, s.pod, s.since = st.ep, st, since })
}

// releaseLocked gives ip back. Pod-network addresses are remembered with
// the release time so late flows still resolve to this pod.
func (ix *index) releaseLocked(st *podState, ip netip.Addr, now time.Time) {
	if st.hostNetwork {
		ix.updateSlot(ip, func(s *addrSlot) {
			if s.hostPods--; s.hostPods <= 0 {
				s.hostPods = 0
				if !s.nodeAddr {
					s.node = nil
				}
			}
		})
		return
	}
	s, _ := ix.slot(ip)
	if s.pod != st {
		return
	}
	ix.remember(ip, heldBy{holder: s.ep, since: s.since, until: now.UnixNano()})
	ix.updateSlot(ip, func(s *addrSlot) { s.ep, s.pod, s.since = nil, nil, 0 })
}

// remember appends a past holder of ip to the released LRU. The stored
// slice is new each time: readers hold older slices without locks.
func (ix *index) remember(ip netip.Addr, h heldBy) {
	prev, _ := ix.released.Peek(ip)
	if len(prev) >= maxHoldersPerIP {
		prev = prev[len(prev)-maxHoldersPerIP+1:]
	}
	hist := make([]heldBy, 0, len(prev)+1)
	hist = append(append(hist, prev...), h)
	ix.released.Add(ip, hist)
	ix.updateSlot(ip, func(s *addrSlot) { s.released = true })
}

// nodeLocked returns the state of a node, creating a placeholder.
func (ix *index) nodeLocked(name string) *nodeState {
	n := ix.nodes[name]
	if n == nil {
		n = &nodeState{name: name, pods: make(map[*podState]struct{})}
		n.ep = nodeEndpoint(n)
		ix.nodes[name] = n
	}
	return n
}

func (ix *index) detachNodeLocked(st *podState) {
	if st.node == nil {
		return
	}
	delete(st.node.pods, st)
	ix.gcNodeLocked(st.node)
	st.node = nil
}

// gcNodeLocked drops a placeholder node nobody references any more.
func (ix *index) gcNodeLocked(n *nodeState) {
	if !n.known && len(n.pods) == 0 && len(n.addrs) == 0 {
		delete(ix.nodes, n.name)
	}
}

func (ix *index) setOwnerLocked(st *podState, via *ownerKey) {
	if st.via != nil && (via == nil || *via != *st.via) {
		if set := ix.byOwner[*st.via]; set != nil {
			delete(set, st)
			if len(set) == 0 {
				delete(ix.byOwner, *st.via)
			}
		}
	}
	if via != nil {
		set := ix.byOwner[*via]
		if set == nil {
			set = make(map[*podState]struct{})
			ix.byOwner[*via] = set
		}
		set[st] = struct{}{}
	}
	st.via = via
}

// upsertNode applies an added or updated node: placement labels and
// addresses. The endpoints of its pods are rebuilt when its own changed,
// which is how a zone label added later reaches every pod on the node.
func (ix *index) upsertNode(n *corev1.Node) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	st := ix.nodeLocked(n.Name)
	st.known = true
	st.zone = firstLabel(n.Labels, LabelZone, labelZoneBeta)
	st.region = firstLabel(n.Labels, LabelRegion, labelRegionBeta)
	var addrs []netip.Addr
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil {
			if ip = normalize(ip); ip.IsValid() && !slices.Contains(addrs, ip) {
				addrs = append(addrs, ip)
			}
		}
	}
	ix.setNodeAddrsLocked(st, addrs)
	ix.refreshNodeLocked(st)
}

// deleteNode forgets a node; pods still on it resolve as unknown/no_node.
func (ix *index) deleteNode(name string) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	st := ix.nodes[name]
	if st == nil {
		return
	}
	st.known, st.zone, st.region = false, "", ""
	ix.setNodeAddrsLocked(st, nil)
	ix.refreshNodeLocked(st)
	ix.gcNodeLocked(st)
}

func (ix *index) setNodeAddrsLocked(st *nodeState, addrs []netip.Addr) {
	for _, ip := range st.addrs {
		if slices.Contains(addrs, ip) {
			continue
		}
		ix.updateSlot(ip, func(s *addrSlot) {
			if s.node == st {
				s.nodeAddr = false
				if s.hostPods == 0 {
					s.node = nil
				}
			}
		})
	}
	for _, ip := range addrs {
		ix.updateSlot(ip, func(s *addrSlot) { s.node, s.nodeAddr = st, true })
	}
	st.addrs = addrs
}

// refreshNodeLocked rebuilds the node's endpoint and, if it changed, those
// of its pods.
func (ix *index) refreshNodeLocked(st *nodeState) {
	ep := sameOrNew(st.ep, nodeEndpoint(st))
	if ep == st.ep {
		return
	}
	st.ep = ep
	for p := range st.pods {
		ix.refreshPodLocked(p)
	}
}

// ownerChanged rebuilds the pods named through a ReplicaSet or Job whose
// metadata was added, changed or deleted.
func (ix *index) ownerChanged(k ownerKey) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	for p := range ix.byOwner[k] {
		ix.refreshPodLocked(p)
	}
}

// refreshPodLocked renames a pod's workload and rebuilds its endpoint.
func (ix *index) refreshPodLocked(st *podState) {
	name, kind, via := workloadOf(st.namespace, st.name, st.owner, ix.owners)
	ix.setOwnerLocked(st, via)
	ep := sameOrNew(st.ep, podEndpoint(st, name, kind))
	if ep == st.ep {
		return
	}
	st.ep = ep
	for _, ip := range st.ips {
		if s, ok := ix.slot(ip); ok && s.pod == st {
			s.ep = ep
			ix.setSlot(ip, s)
		}
	}
}

// labelValues returns the values of the requested pod labels, reusing old
// when nothing changed (so endpoints compare equal cheaply).
func (ix *index) labelValues(labels map[string]string, old []string) []string {
	if len(ix.podLabels) == 0 {
		return nil
	}
	vals := make([]string, len(ix.podLabels))
	for i, k := range ix.podLabels {
		vals[i] = labels[k]
	}
	if slices.Equal(vals, old) {
		return old
	}
	return vals
}
