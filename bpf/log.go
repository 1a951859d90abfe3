//go:build linux

package bpf

import (
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/kubezonnet/kubezonnet/internal/flow"
)

// pollLoop reads the flow log until Close, so that each CPU's ring has
// room for the records of the next wait (see flow_log in flow.c). The
// wait adapts to the fullest ring, within [LogPollMin, LogPollMax]: it
// halves when a read found a ring more than a quarter full, and doubles
// when every ring was less than a sixteenth full. A node whose flows fit
// the table wakes ten times a second; a busy one reads often enough that
// no ring fills, and in batches large enough that its lines have left
// the writing CPU's caches.
func (d *Datapath) pollLoop() {
	defer close(d.polled)
	wait := LogPollMin
	t := time.NewTimer(wait)
	defer t.Stop()
	ring := 1 << d.logShift
	for {
		select {
		case <-d.stop:
			return
		case <-t.C:
		}
		d.mu.Lock()
		most := 0
		if !d.closed {
			most = d.pollLog(nil)
		}
		d.mu.Unlock()
		switch {
		case most > ring/4:
			wait = max(wait/2, LogPollMin)
		case most < ring/16:
			wait = min(wait*2, LogPollMax)
		}
		t.Reset(wait)
	}
}

// pollLog adds the records each CPU's ring holds to d.logSum, and gives
// their room back to the program. Called with d.mu held. Once the flows
// read since the last drain number maxLogFlows, it leaves the records of
// new flows in the ring until the next drain: a full ring sends the
// program to the hash map, which is bounded and counts what it refuses,
// so memory stays bounded and nothing is lost silently. With upTo, it
// reads each CPU's ring up to upTo[cpu] at most, instead of up to where
// the program has written now. It returns the most records one ring held.
func (d *Datapath) pollLog(upTo []uint32) (most int) {
	mask := uint32(1)<<d.logShift - 1
	for cpu := range d.logs {
		l := &d.logs[cpu]
		// Loaded before the records: the program stores head after them
		// (see log_flow in flow.c).
		head := atomic.LoadUint32(&l.Head)
		if upTo != nil {
			head = upTo[cpu]
		}
		tail := atomic.LoadUint32(&l.Tail)
		if head == tail {
			continue
		}
		most = max(most, int(head-tail))
		ring := d.log[cpu<<d.logShift : (cpu+1)<<d.logShift]
		for ; tail != head; tail++ {
			r := &ring[tail&mask]
			k := (*flowFlowKey)(unsafe.Pointer(&r.Key))
			c := flow.Counts{Bytes: uint64(r.Bytes), Packets: uint64(r.Packets)}
			fresh, added := d.logSum.add(k, c, d.maxLogFlows)
			if !added {
				break
			}
			if fresh {
				d.logNew[cpu]++
			}
			d.logged++
		}
		atomic.StoreUint32(&l.Tail, tail)
	}
	return most
}

// takeLog reads every record the log holds up to now into the log's sum,
// for the drain: the table's and the hash map's flows are then added to
// the sum's when it has them (logSum.addExisting, one probe each: the
// sum is the index of its own flows), and appendLog or putLog moves the
// sum to dst last. Called with d.mu held, after the drain has waited for the
// programs in flight, so that every record of an instance that has
// finished is read. It reads each ring up to where it stood on entry:
// the records programs write meanwhile are the next drain's. When the
// sum fills (maxLogFlows) before that, it moves the sum's flows to dst
// through the drain's merger and reads on, as many times as it takes, and
// reports that it moved some.
func (d *Datapath) takeLog(dst *Drained) (moved bool) {
	if d.heads == nil {
		d.heads = make([]uint32, len(d.logs))
	}
	for cpu := range d.logs {
		d.heads[cpu] = atomic.LoadUint32(&d.logs[cpu].Head)
	}
	for {
		d.pollLog(d.heads)
		if !d.logBehind() {
			return moved
		}
		d.putLog(dst)
		moved = true
	}
}

// putLog moves the flows of the log's sum to dst through the drain's
// merger, which looks each up among the flows in dst (after the first
// move, which has none).
func (d *Datapath) putLog(dst *Drained) {
	d.merge.startIndex(dst.Flows)
	d.logSum.flows(func(k *flowFlowKey, c flow.Counts) {
		dst.Flows = d.merge.add(dst.Flows, k, c)
	})
	d.resetLog(dst)
}

// appendLog moves the flows of the log's sum to dst when none of them is
// there: the drain's last step when takeLog moved nothing, the table's and
// the hash map's flows having been added to the sum's where it had them.
// No lookups; the merger is not told, and takes no flow after.
func (d *Datapath) appendLog(dst *Drained) {
	d.logSum.flows(func(k *flowFlowKey, c flow.Counts) {
		dst.Flows = append(dst.Flows, flow.Record{Key: convertKey(k), Counts: c})
	})
	d.resetLog(dst)
}

// resetLog empties the log's sum once its flows are in dst.
func (d *Datapath) resetLog(dst *Drained) {
	dst.Logged += d.logged
	d.logSum.reset()
	d.logged = 0
}

// logBehind reports whether a ring still holds records below d.heads.
func (d *Datapath) logBehind() bool {
	for cpu := range d.logs {
		if atomic.LoadUint32(&d.logs[cpu].Tail) != d.heads[cpu] {
			return true
		}
	}
	return false
}
