package resolve

import (
	"net/netip"
	"time"
)

// cut is a release of an address that the node holding it reported (its
// agent saw the pod's host route go away, wire.Batch.Released): the
// agent drained right after the release, so that node's flows stamped
// after the batch that carried it are not those of any pod that held the
// address at the release.
//
// It closes the gap the informer leaves: a flow drained after the release
// but before this server's informer delivers the deletion would otherwise
// go to the deleted pod, which the index still shows holding the address.
// Only the reporting node's flows are ordered after the release (its
// batches are one stream); another node's flow stamped after it may still
// carry packets sent to the former holder before, so for those the
// release only stands in for the deletion the informer has not shown yet
// (see afterCut).
type cut struct {
	node string
	// released is when the agent saw the release, and at the time of
	// the batch that reported it (at or after), in Unix nanoseconds.
	released, at int64
}

// Released records that node's agent saw ip released, at time released,
// by the pod holding it, and reported it in its batch stamped at: from
// then on, that node's flows of ip stamped after at go to a pod that got
// the address after released (Lookup), and wait for one while the
// informer shows none (within ReuseWindow of the flow). The informer's
// times are this server's and the agent's are its node's: clocks apart
// by less than a new pod takes to get an address (its sandbox created,
// then its status written) give the same answers. It reports whether the
// release is recorded: only a pod address held at released by a pod of
// node is, and only a release not earlier than the one recorded for ip.
func (r *Resolver) Released(ip netip.Addr, node string, released, at time.Time) bool {
	ip = normalize(ip)
	if !ip.IsValid() || ip.IsUnspecified() || node == "" || at.Before(released) {
		return false
	}
	ep, _ := r.ix.lookupSlot(ip, released)
	if ep == nil || ep.Pod == "" || ep.Node != node {
		return false
	}
	return r.ix.cutAt(ip, cut{node: node, released: released.UnixNano(), at: at.UnixNano()})
}

// cutAt records c for ip unless a later release is recorded; the same
// release again (the batch carrying a release its notice reported) keeps
// the first report, and counts as recorded.
func (ix *index) cutAt(ip netip.Addr, c cut) bool {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if prev, ok := ix.cuts.Peek(ip); ok && prev.released >= c.released {
		return prev.released == c.released && prev.node == c.node
	}
	ix.cuts.Add(ip, c)
	ix.updateSlot(ip, func(s *addrSlot) { s.cut = true })
	return true
}

// afterCut resolves a flow of ip at time at reported by node, when a
// release of ip was reported before at (applies is false otherwise, and
// the caller keeps the index's answer).
//
// The reporting node's flows stamped after its report go to a pod that
// got the address after the release, by the rules of holderAt. With none
// shown yet, such a flow awaits one until ReuseWindow after at (the
// informer shows an assignment at most that long after it happened, and
// the flow's packets came after the assignment), and is then nobody's.
//
// Another node's flow stamped after the release may carry packets sent
// before it, to the released pod, drained later; the release only
// replaces what the informer may not show yet. The flow goes to a pod
// that got the address after the release when that pod may have held it
// at the flow's time (the informer showed it at most ReuseWindow after),
// else to the released pod, as holderAt does after a release the
// informer saw; while the informer shows no later pod, it awaits one
// until ReuseWindow after the release, as awaitsHolder does.
//
// s is the address's slot as lookupSlot returned it, and former what
// lookupSlot resolved: the released pod, while the informer shows it.
func (ix *index) afterCut(ip netip.Addr, at time.Time, node string, s *addrSlot, former *Endpoint, now time.Time) (ep *Endpoint, awaiting, applies bool) {
	c, ok := ix.cuts.Peek(ip)
	t := at.UnixNano()
	own := ok && c.node == node
	if !ok || (own && t <= c.at) || (!own && t <= c.released) {
		return nil, false, false
	}
	var after []heldBy
	if s.released {
		hist, _ := ix.released.Peek(ip)
		i := 0
		for i < len(hist) && hist[i].since <= c.released {
			i++
		}
		after = hist[i:]
	}
	var cur *Endpoint
	if s.pod != nil && s.since > c.released {
		cur = s.ep
	}
	if len(after) == 0 && cur == nil {
		switch {
		case own && now.UnixNano() < t+ix.reuse:
			return former, true, true
		case own:
			return nil, false, true
		default:
			return former, now.UnixNano() < c.released+ix.reuse, true
		}
	}
	first := s.since
	if len(after) > 0 {
		first = after[0].since
	}
	switch {
	case !own && t < first-ix.reuse:
		return former, false, true
	case len(after) == 0:
		return cur, false, true
	}
	return holderAt(after, cur, s.since, t, ix.reuse, int64(ix.ttl)), false, true
}
