package resolve

import (
	"math"
	"net/netip"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Services and their endpoints, for flows addressed to a Service's
// virtual IP before kube-proxy (or its replacement) translated it: which
// Service the client addressed, what traffic distribution it asked for,
// and whether a ready endpoint of it was in the client's zone at the time.
// See doc.go for the semantics; this file holds the state.

// Bounds of the service state that the cluster's objects do not bound by
// themselves. Live Services, their EndpointSlices and the zones those name
// are bounded by the cluster (the informer caches hold them anyway); what
// churn leaves behind is bounded here.
const (
	// maxZoneTransitions is how many readiness changes are remembered per
	// Service and zone. Within --released-ip-ttl an endpoint rarely
	// changes more often than a rollout or two makes it; beyond this,
	// the oldest are forgotten and the oldest remembered state answers for
	// earlier times.
	maxZoneTransitions = 16
	// maxReleasedVIPs bounds the virtual IP and port pairs remembered after
	// their Service was deleted or stopped serving them: more than a
	// 500-node cluster deletes within --released-ip-ttl, even with CI
	// jobs creating and deleting Services in a loop.
	maxReleasedVIPs = 16384
	// maxDeletedServices bounds the deleted Services whose endpoint
	// history is kept for late flows, for the same reason.
	maxDeletedServices = 4096
	// maxHoldersPerVIP bounds the Services remembered for one virtual IP
	// and port: the allocator reuses a freed ClusterIP only after the
	// others of the range, so more than a few owners within the window
	// never happen.
	maxHoldersPerVIP = 4
	// maxZones bounds the distinct zone names remembered. Clusters span
	// a handful of zones; this only guards against endpoints naming
	// garbage zones, whose readiness is then not tracked.
	maxZones = 1024
)

// IP protocol numbers of the protocols a Service port can have.
const (
	protoTCP  = 6
	protoUDP  = 17
	protoSCTP = 132
)

// ReadyInZone reports, for the time at, whether svc had a ready endpoint
// in zone (an EndpointSlice endpoint with conditions.ready true or unset
// and that zone) and whether a ready endpoint carried a topology hint for
// zone (hints.forZones): whether a flow from zone to svc had a local
// endpoint to go to. Both are false for a nil svc, one the resolver did
// not hand out, an empty zone and a zone without endpoints. The answer
// changes at the time this server's informer saw the EndpointSlice
// change (see doc.go). It does not allocate and is safe for concurrent
// use.
func (r *Resolver) ReadyInZone(svc *Service, zone string, at time.Time) (ready, hinted bool) {
	if svc == nil || svc.st == nil || zone == "" {
		return false, false
	}
	return r.svc.readyInZone(svc.st, zone, at.UnixNano())
}

// Service returns the Service whose virtual IP and port dst was, for
// protocol proto (an IP protocol number: 6 TCP, 17 UDP, 132 SCTP), when
// a flow was observed at time at; nil when none is known. The address
// may be IPv4, IPv6 or IPv4-mapped. Headless and ExternalName Services
// have no virtual IP and are never returned. A deleted Service, or a port
// it no longer serves, still answers for flows up to Config.ReleasedIPTTL
// after the informer saw the change; a flow older than every Service
// remembered for the address goes to the oldest. Before the informers have
// synced, Services not listed yet are unknown. It does not allocate and
// is safe for concurrent use; the *Service is shared and immutable (see
// Service).
func (r *Resolver) Service(dst netip.AddrPort, proto uint8, at time.Time) *Service {
	return r.svc.lookup(dst, proto, at.UnixNano())
}

// vipKey is one virtual IP (16-byte form of the normalized address), port
// and IP protocol.
type vipKey struct {
	addr  addrKey
	port  uint16
	proto uint8
}

// vipHolder is a Service that held a virtual IP and port: since and until
// are the informer times it was seen to get and lose it (Unix
// nanoseconds; heldSinceStart for Services of the initial list, heldNow
// while it still holds it).
type vipHolder = tenure[*Service]

// heldNow is the "until" of a holder that still holds its address.
const heldNow = math.MaxInt64

// svcState is everything known of one namespace/name: the Service object
// (nil while there is none: not seen yet, or deleted), its EndpointSlices'
// contributions and the readiness history of each zone.
type svcState struct {
	namespace, name string
	uid             types.UID
	info            *Service              // handed out; nil: no Service object now
	vips            []vipKey              // held now
	slices          map[string]zoneCounts // by EndpointSlice name
	zones           []zoneHistory
	deletedAt       int64 // when the Service was seen deleted; 0 if never
}

// counts are a zone's ready endpoints and ready endpoints hinted for it.
type counts struct{ ready, hinted int32 }

// zoneCounts are one EndpointSlice's counts per zone: a short list (a
// slice spans a few zones), smaller than a map.
type zoneCounts []zoneCount

type zoneCount struct {
	zone string
	counts
}

// get returns the counts of zone (zero when absent).
func (zc zoneCounts) get(zone string) counts {
	for _, c := range zc {
		if c.zone == zone {
			return c.counts
		}
	}
	return counts{}
}

// add adds to the counts of zone.
func (zc *zoneCounts) add(zone string, ready, hinted int32) {
	for i := range *zc {
		if c := &(*zc)[i]; c.zone == zone {
			c.ready += ready
			c.hinted += hinted
			return
		}
	}
	*zc = append(*zc, zoneCount{zone: zone, counts: counts{ready: ready, hinted: hinted}})
}

// transition is a zone's counts from time at (Unix nanoseconds) on.
type transition struct {
	at int64
	counts
}

// zoneID is an interned zone name: a lookup compares it instead of a
// string, which keeps a Service's zones in one small array.
type zoneID uint16

// zoneHistory is the recent readiness of one Service in one zone: its
// latest transition and, oldest first, the ones before. The oldest always
// starts at heldSinceStart, so every time has a state: a zone that gets
// endpoints later starts with a zero transition, and when old transitions
// are forgotten the oldest kept one answers for all earlier times. The
// latest is kept apart so the common query, about the last few seconds,
// reads no other memory.
type zoneHistory struct {
	zone  zoneID
	last  transition
	older []transition
}

// at returns the counts at time t.
func (h *zoneHistory) at(t int64) counts {
	if t >= h.last.at {
		return h.last.counts
	}
	for i := len(h.older) - 1; i > 0; i-- {
		if h.older[i].at <= t {
			return h.older[i].counts
		}
	}
	return h.older[0].counts
}

// len is the number of transitions kept.
func (h *zoneHistory) len() int { return len(h.older) + 1 }

// nth returns the i-th transition, oldest first.
func (h *zoneHistory) nth(i int) *transition {
	if i < len(h.older) {
		return &h.older[i]
	}
	return &h.last
}

// set records the counts c from time t on, forgetting transitions that
// can no longer answer a query: those superseded before cutoff (the
// window) and those beyond maxZoneTransitions.
func (h *zoneHistory) set(t int64, c counts, cutoff int64) {
	switch {
	case h.last.counts == c:
		return
	case t <= h.last.at:
		// Same informer time (or the clock went back): the newer event
		// wins.
		h.last.counts = c
	default:
		h.older = append(h.older, h.last)
		h.last = transition{at: t, counts: c}
	}
	drop := 0
	for drop+1 < h.len() && h.nth(drop+1).at <= cutoff {
		drop++
	}
	drop = max(drop, h.len()-maxZoneTransitions)
	if drop > 0 {
		h.older = append(h.older[:0], h.older[drop:]...)
		h.nth(0).at = heldSinceStart
	}
}

// releasedVIP is a holder's release, queued so it is forgotten after the
// window.
type releasedVIP struct {
	at  int64
	key vipKey
	svc *Service
}

// deletedSvc is a Service's deletion, queued likewise.
type deletedSvc struct {
	at int64
	st *svcState
}

// serviceTable is the Services' state. Informer handlers write it under
// mu; lookups read it under mu.RLock. It has its own lock so that Service
// churn never stalls pod lookups and the other way round.
type serviceTable struct {
	mu     sync.RWMutex
	byName map[string]*svcState // namespace/name
	// sliceOf is the state each EndpointSlice counts in, by the slice's
	// namespace/name.
	sliceOf map[string]*svcState
	// zoneIDs interns the zones EndpointSlices name; at most maxZones.
	zoneIDs  map[string]zoneID
	vips     map[vipKey][]vipHolder
	released []releasedVIP // oldest first
	deleted  []deletedSvc  // oldest first

	// window is Config.ReleasedIPTTL and reuse Config.ReuseWindow, in
	// nanoseconds.
	window, reuse int64
	// maxReleased and maxDeleted are maxReleasedVIPs and
	// maxDeletedServices; tests lower them.
	maxReleased, maxDeleted int
}

func newServiceTable(window, reuse time.Duration) *serviceTable {
	return &serviceTable{
		byName:      make(map[string]*svcState),
		sliceOf:     make(map[string]*svcState),
		zoneIDs:     make(map[string]zoneID),
		vips:        make(map[vipKey][]vipHolder),
		window:      int64(window),
		reuse:       int64(reuse),
		maxReleased: maxReleasedVIPs,
		maxDeleted:  maxDeletedServices,
	}
}

// lookup is Resolver.Service with the time in Unix nanoseconds.
func (t *serviceTable) lookup(dst netip.AddrPort, proto uint8, at int64) *Service {
	ip := normalize(dst.Addr())
	if !ip.IsValid() {
		return nil
	}
	key := vipKey{addr: ip.As16(), port: dst.Port(), proto: proto}
	t.mu.RLock()
	defer t.mu.RUnlock()
	hs := t.vips[key]
	if len(hs) == 0 {
		return nil
	}
	return holderAt(hs, nil, 0, at, t.reuse, t.window)
}

// readyInZone reads the zone's counts of st at time at.
func (t *serviceTable) readyInZone(st *svcState, zone string, at int64) (ready, hinted bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	id, ok := t.zoneIDs[zone]
	if !ok {
		return false, false
	}
	h := st.zoneHistory(id)
	if h == nil {
		return false, false
	}
	c := h.at(at)
	return c.ready > 0, c.hinted > 0
}

// stateLocked returns the state of namespace/name, creating it.
func (t *serviceTable) stateLocked(namespace, name string) *svcState {
	k := namespace + "/" + name
	st := t.byName[k]
	if st == nil {
		st = &svcState{namespace: namespace, name: name, slices: make(map[string]zoneCounts)}
		t.byName[k] = st
	}
	return st
}

// upsertService applies an added or updated Service seen at now; initial
// marks Services of the informer's first list, which count as holding
// their virtual IPs since forever.
func (t *serviceTable) upsertService(s *corev1.Service, now int64, initial bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.expireLocked(now)
	st := t.stateLocked(s.Namespace, s.Name)
	if st.info != nil && st.uid != s.UID {
		// Deleted and created again, folded into one update.
		t.releaseAllLocked(st, now)
		st.info = nil
	}
	st.uid, st.deletedAt = s.UID, 0
	td := ""
	if s.Spec.TrafficDistribution != nil {
		td = *s.Spec.TrafficDistribution
	}
	if st.info == nil || st.info.TrafficDistribution != td {
		// A new pointer, never a changed one: consumers key by it.
		info := &Service{Namespace: s.Namespace, Name: s.Name, TrafficDistribution: td, st: st}
		for _, k := range st.vips {
			hs := t.vips[k]
			hs[len(hs)-1].holder = info
		}
		st.info = info
	}
	want := serviceVIPs(s)
	for _, k := range st.vips {
		if !slices.Contains(want, k) {
			t.releaseLocked(st, k, now)
		}
	}
	since := now
	if initial {
		since = heldSinceStart
	}
	for _, k := range want {
		if !slices.Contains(st.vips, k) {
			t.claimLocked(st.info, k, since, now)
		}
	}
	st.vips = want
}

// deleteService applies a deleted Service (uid "" when unknown): its
// virtual IPs are released, its endpoint history kept for the window.
func (t *serviceTable) deleteService(namespace, name string, uid types.UID, now int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.expireLocked(now)
	st := t.byName[namespace+"/"+name]
	if st == nil || st.info == nil || (uid != "" && st.uid != uid) {
		return
	}
	t.releaseAllLocked(st, now)
	st.info, st.deletedAt = nil, now
	t.deleted = append(t.deleted, deletedSvc{at: now, st: st})
	t.expireLocked(now)
}

func (t *serviceTable) releaseAllLocked(st *svcState, now int64) {
	for _, k := range st.vips {
		t.releaseLocked(st, k, now)
	}
	st.vips = nil
}

// claimLocked makes svc the holder of k. A holder that still has it (its
// change not delivered yet) loses it now.
func (t *serviceTable) claimLocked(svc *Service, k vipKey, since, now int64) {
	hs := t.vips[k]
	if n := len(hs); n > 0 && hs[n-1].until == heldNow {
		prev := hs[n-1].holder.st
		prev.vips = slices.DeleteFunc(prev.vips, func(v vipKey) bool { return v == k })
		hs[n-1].until = now
		t.queueReleaseLocked(k, hs[n-1].holder, now)
	}
	if len(hs) >= maxHoldersPerVIP {
		hs = hs[len(hs)-maxHoldersPerVIP+1:]
	}
	t.vips[k] = append(slices.Clip(hs), vipHolder{holder: svc, since: since, until: heldNow})
}

// releaseLocked ends st's hold on k; the holder stays for late flows.
func (t *serviceTable) releaseLocked(st *svcState, k vipKey, now int64) {
	hs := t.vips[k]
	if n := len(hs); n > 0 && hs[n-1].until == heldNow && hs[n-1].holder.st == st {
		hs[n-1].until = now
		t.queueReleaseLocked(k, hs[n-1].holder, now)
	}
}

func (t *serviceTable) queueReleaseLocked(k vipKey, svc *Service, now int64) {
	t.released = append(t.released, releasedVIP{at: now, key: k, svc: svc})
}

// expireLocked forgets released holders and deleted Services older than
// the window, and the oldest beyond the count bounds.
func (t *serviceTable) expireLocked(now int64) {
	cutoff := now - t.window
	n := 0
	for n < len(t.released) && (t.released[n].at <= cutoff || len(t.released)-n > t.maxReleased) {
		r := t.released[n]
		t.vips[r.key] = slices.DeleteFunc(t.vips[r.key], func(h vipHolder) bool {
			return h.holder == r.svc && h.until != heldNow && h.until <= r.at
		})
		if len(t.vips[r.key]) == 0 {
			delete(t.vips, r.key)
		}
		n++
	}
	t.released = t.released[n:]
	n = 0
	for n < len(t.deleted) && (t.deleted[n].at <= cutoff || len(t.deleted)-n > t.maxDeleted) {
		d := t.deleted[n]
		if d.st.info == nil && d.st.deletedAt == d.at {
			d.st.deletedAt = 0
			t.gcLocked(d.st)
		}
		n++
	}
	t.deleted = t.deleted[n:]
}

// gcLocked forgets a state that no Service, EndpointSlice or recent
// deletion needs. Holders may still point to it for the window: they read
// it as it was.
func (t *serviceTable) gcLocked(st *svcState) {
	if st.info != nil || len(st.slices) > 0 || st.deletedAt != 0 {
		return
	}
	k := st.namespace + "/" + st.name
	if t.byName[k] == st {
		delete(t.byName, k)
	}
}

// upsertSlice applies an added or updated EndpointSlice seen at now
// (initial: of the informer's first list, counting since forever).
func (t *serviceTable) upsertSlice(es *discoveryv1.EndpointSlice, now int64, initial bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.expireLocked(now)
	at := now
	if initial {
		at = heldSinceStart
	}
	key := es.Namespace + "/" + es.Name
	svc := es.Labels[discoveryv1.LabelServiceName]
	if prev := t.sliceOf[key]; prev != nil && prev.name != svc {
		// The label changed: the slice leaves its former Service.
		delete(t.sliceOf, key)
		t.setSliceLocked(prev, es.Name, nil, at, now)
	}
	if svc == "" {
		return
	}
	st := t.stateLocked(es.Namespace, svc)
	t.sliceOf[key] = st
	t.setSliceLocked(st, es.Name, sliceCounts(es), at, now)
}

// deleteSlice applies a deleted EndpointSlice.
func (t *serviceTable) deleteSlice(namespace, name string, now int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.expireLocked(now)
	key := namespace + "/" + name
	if st := t.sliceOf[key]; st != nil {
		delete(t.sliceOf, key)
		t.setSliceLocked(st, name, nil, now, now)
	}
}

// setSliceLocked replaces one slice's contribution to st (nil: the slice
// is gone) and records the zones whose counts changed as of at.
func (t *serviceTable) setSliceLocked(st *svcState, slice string, c zoneCounts, at, now int64) {
	old := st.slices[slice]
	if c == nil {
		delete(st.slices, slice)
	} else {
		st.slices[slice] = c
	}
	for _, z := range old {
		t.recountLocked(st, z.zone, at, now)
	}
	for _, z := range c {
		if !slices.ContainsFunc(old, func(o zoneCount) bool { return o.zone == z.zone }) {
			t.recountLocked(st, z.zone, at, now)
		}
	}
	t.gcLocked(st)
}

// recountLocked sums a zone's counts over st's slices and records them
// from at on if they changed; now (the informer clock) places the window.
func (t *serviceTable) recountLocked(st *svcState, zone string, at, now int64) {
	var total counts
	for _, c := range st.slices {
		z := c.get(zone)
		total.ready += z.ready
		total.hinted += z.hinted
	}
	id, ok := t.zoneIDs[zone]
	if !ok {
		if total == (counts{}) || len(t.zoneIDs) >= maxZones {
			return
		}
		id = zoneID(len(t.zoneIDs))
		t.zoneIDs[zone] = id
	}
	h := st.zoneHistory(id)
	if h == nil {
		if total == (counts{}) {
			return
		}
		// Before at, the zone had nothing.
		st.zones = append(st.zones, zoneHistory{zone: id, last: transition{at: heldSinceStart}})
		h = &st.zones[len(st.zones)-1]
	}
	h.set(at, total, now-t.window)
	if h.len() == 1 && h.last.counts == (counts{}) {
		// Nothing in the window: the zero answer, which needs no entry.
		*h = st.zones[len(st.zones)-1]
		st.zones = st.zones[:len(st.zones)-1]
	}
}

// zoneHistory returns the history of zone id, nil if it has none.
func (st *svcState) zoneHistory(id zoneID) *zoneHistory {
	for i := range st.zones {
		if st.zones[i].zone == id {
			return &st.zones[i]
		}
	}
	return nil
}

// sliceCounts counts one EndpointSlice's ready endpoints per zone, and
// per zone the ready endpoints hinted for it. An unset ready condition
// means ready, as the EndpointSlice API says.
func sliceCounts(es *discoveryv1.EndpointSlice) zoneCounts {
	c := zoneCounts{}
	for i := range es.Endpoints {
		e := &es.Endpoints[i]
		if e.Conditions.Ready != nil && !*e.Conditions.Ready {
			continue
		}
		if e.Zone != nil && *e.Zone != "" {
			c.add(*e.Zone, 1, 0)
		}
		if e.Hints != nil {
			for _, fz := range e.Hints.ForZones {
				if fz.Name != "" {
					c.add(fz.Name, 0, 1)
				}
			}
		}
	}
	return slices.Clip(c)
}

// serviceVIPs returns the virtual IP, port and protocol triples of a
// Service: every address of spec.clusterIPs (spec.clusterIP when empty)
// with every port. Headless ("None") and ExternalName Services have none.
func serviceVIPs(s *corev1.Service) []vipKey {
	if s.Spec.Type == corev1.ServiceTypeExternalName {
		return nil
	}
	ips := s.Spec.ClusterIPs
	if len(ips) == 0 && s.Spec.ClusterIP != "" {
		ips = []string{s.Spec.ClusterIP}
	}
	var out []vipKey
	for _, a := range ips {
		ip, err := netip.ParseAddr(a)
		if err != nil {
			continue // "None" (headless) or garbage
		}
		ip = normalize(ip)
		if !ip.IsValid() || ip.IsUnspecified() {
			continue
		}
		for _, p := range s.Spec.Ports {
			proto, ok := ipProtocol(p.Protocol)
			if !ok || p.Port <= 0 || p.Port > math.MaxUint16 {
				continue
			}
			k := vipKey{addr: ip.As16(), port: uint16(p.Port), proto: proto}
			if !slices.Contains(out, k) {
				out = append(out, k)
			}
		}
	}
	return out
}

// ipProtocol maps a Service port's protocol to its IP protocol number;
// unset means TCP, as the API server defaults it.
func ipProtocol(p corev1.Protocol) (uint8, bool) {
	switch p {
	case corev1.ProtocolTCP, "":
		return protoTCP, true
	case corev1.ProtocolUDP:
		return protoUDP, true
	case corev1.ProtocolSCTP:
		return protoSCTP, true
	}
	return 0, false
}
