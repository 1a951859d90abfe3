package resolve

// tenure is one holder of an address over [since, until], in Unix
// nanoseconds: a pod's of a pod address (heldBy), a Service's of a
// virtual IP (vipHolder).
type tenure[T comparable] struct {
	holder       T
	since, until int64
}

// holderAt picks the holder of an address at time at among its tenures hs
// (oldest first) and next, the holder after them (the zero T for none),
// seen since nextSince: the last one that got the address at or before at
// and still had it then. A flow after a holder's release belongs to the
// next holder if that one may have had the address then (it was seen at
// most reuse after at: the informer sees an assignment after it
// happened); with no such holder, to the released one within grace (a
// flow drained late), else to none. A flow older than every tenure goes
// to the oldest.
func holderAt[T comparable](hs []tenure[T], next T, nextSince, at, reuse, grace int64) T {
	var none T
	for i := len(hs) - 1; i >= 0; i-- {
		h := &hs[i]
		if at < h.since {
			continue
		}
		if at <= h.until {
			return h.holder
		}
		n, nSince := next, nextSince
		if i+1 < len(hs) {
			n, nSince = hs[i+1].holder, hs[i+1].since
		}
		if n != none && at >= nSince-reuse {
			return n
		}
		if at < h.until+grace {
			return h.holder
		}
		return none
	}
	if len(hs) == 0 {
		return none
	}
	return hs[0].holder
}
