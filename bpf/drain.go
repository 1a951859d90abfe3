//go:build linux

package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/kubezonnet/kubezonnet/internal/flow"
)

const (
	// drainBatch is the number of flows fetched per batch syscall. It
	// must exceed the largest hash bucket or the kernel answers ENOSPC.
	drainBatch = 4096
	// quiesceTimeout bounds how long one drain waits for the CPUs'
	// in-flight counters to reach zero. An instance runs for well under a
	// microsecond; the wait only grows while one is preempted in process
	// context (cgroup_skb egress runs in the sender's), for a scheduler
	// time slice or a few: milliseconds. One second is far beyond that
	// and still a tenth of the default flush interval and shutdown
	// timeout, so a counter that never returns to zero (a bug in the
	// protocol, or memory written by something else) costs a drain one
	// second instead of hanging the agent, and Close and SetLocalPrefixes,
	// which wait for the same lock.
	quiesceTimeout = time.Second
)

// Drained is the result of one Drain: every flow counted since the previous
// drain, and what could not be counted, by reason, over the same interval.
type Drained struct {
	Flows []flow.Record
	// Uncounted holds, per Reason, the bytes and packets not counted in
	// Flows. ReasonNotLocal is informational, the others are losses.
	Uncounted [NumReasons]flow.Counts
	// Waited is how long the drain waited for program instances still
	// running on the old generation: normally zero, it grows when a
	// program is preempted (process context on a preemptible kernel).
	Waited time.Duration
	// Stuck lists the CPUs whose in-flight counter was still not zero
	// when the drain's bounded wait ran out: the drain went on without
	// them. Normally empty. An instance still running there when the old
	// generation was read may have written counts the drain missed; they
	// are lost, or (in the hash map) arrive with a later drain.
	Stuck []int
	// TableSlots is the slots in use in each CPU's region of the flow
	// table in the generation this drain made active: sized from the
	// flows per CPU of the latest intervals (never more than the
	// memory bound gives, see TableGeometry).
	TableSlots int
	// Logged is how many records of the flow log the flows of this drain
	// include: observations of flows the table had no room for, one a
	// packet (or a GSO super-packet).
	Logged int
	// Spilled is how many flows the table and the flow log had no room
	// for in the drained generation, counted in its hash map instead,
	// each once per CPU that counted it: slower to count, lost only when
	// the hash map is full as well (ReasonMapFull). More memory
	// (Config.TableMemory) gives the log more room. Read as the
	// generations are switched, it may leave out a flow first counted in
	// the moment before, which then counts in the next drain's.
	Spilled int
}

// Drain swaps the flow generations and returns everything counted in the
// generation that was active, appending flows to dst.Flows[:0].
//
// It loses nothing: after switching the generation it waits until it has seen
// every CPU's in-flight counter at zero, so every program instance that
// could still write to the old generation has finished before it is read
// and emptied (the protocol is in flow.c, above account()). The wait is
// normally a load per CPU: an instance is short (its cost per packet is in
// BENCHMARKS.md), so a drain rarely finds one still running. The wait is
// bounded: a CPU whose counter stays non-zero for a second is listed in
// dst.Stuck and the drain goes on without it.
func (d *Datapath) Drain(dst *Drained) error {
	return d.drain(dst, quiesceTimeout)
}

// drain is Drain with the bound of the wait for in-flight programs passed
// in (tests shorten it).
func (d *Datapath) drain(dst *Drained, timeout time.Duration) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("draining: datapath closed")
	}
	dst.Flows = dst.Flows[:0]
	dst.Logged = 0
	old := d.active
	next := 1 - old
	// Size the next generation from the flows per CPU counted so far in
	// the old one, the log's read up to now: next is empty, and no
	// program writes to it until publish names it (see setSlots).
	d.pollLog(nil)
	busiest, spilled := d.sizer.counts(d.slots[old]/2,
		func(cpu int) uint32 { return atomic.LoadUint32(&d.logs[cpu].Room[old]) },
		func(cpu int) uint32 { return atomic.LoadUint32(&d.inflight[cpu].Spilled) },
		func(cpu int) int { return d.logNew[cpu] })
	clear(d.logNew)
	d.setSlots(next, d.sizer.observe(busiest))
	dst.TableSlots, dst.Spilled = d.slots[next], spilled
	d.publish(next)
	dst.Waited, dst.Stuck = d.waitQuiescent(timeout, dst.Stuck[:0])
	d.active = next
	d.merge.reset()
	moved := d.takeLog(dst)
	d.drainTable(old, dst)
	if err := d.drainMap(d.gens[old], dst); err != nil {
		return err
	}
	if moved {
		d.putLog(dst)
	} else {
		d.appendLog(dst)
	}
	// Free the drained slots for the generation's next turn. Epoch 0 is
	// never used: it is what a slot never written holds.
	e := max(d.epochs[0], d.epochs[1]) + 1
	if e == 0 {
		e = 1
	}
	d.epochs[old] = e
	return d.readCounters(dst)
}

// publish makes generation g, with its current epoch, the one programs
// write to: one atomic store per CPU, which Go orders before the loads of
// waitQuiescent. While it runs, some CPUs count into the new generation
// and some still into the old one; the drain reads the old one only after
// waitQuiescent.
func (d *Datapath) publish(g int) {
	v := uint64(g) | uint64(d.epochs[g])<<32
	for cpu := range d.inflight {
		atomic.StoreUint64(&d.inflight[cpu].Active, v)
	}
}

// waitQuiescent returns once it has seen each CPU's in-flight counter at
// zero after the last publish, or once timeout has passed since it first
// found one that was not: the CPUs not seen at zero by then are appended to
// stuck. It also returns how long it waited when it was not at once. A
// counter stays non-zero only while an instance runs, or is preempted in
// process context: then it yields and looks again.
func (d *Datapath) waitQuiescent(timeout time.Duration, stuck []int) (time.Duration, []int) {
	var start, deadline time.Time
	for cpu := range d.inflight {
		n := &d.inflight[cpu].N
		for spins := 0; atomic.LoadUint32(n) != 0; spins++ {
			if start.IsZero() {
				start = time.Now()
				deadline = start.Add(timeout)
			}
			if spins < 64 {
				continue
			}
			if !time.Now().Before(deadline) {
				stuck = append(stuck, cpu)
				break
			}
			time.Sleep(20 * time.Microsecond)
		}
	}
	if start.IsZero() {
		return 0, stuck
	}
	return time.Since(start), stuck
}

// regionStart is the index in the flow table of the first slot of cpu's
// region in generation g.
func (d *Datapath) regionStart(g, cpu int) int {
	return (g*d.nCPU + cpu) * d.regionSlots
}

// region is the slots in use of cpu's region in generation g, read
// through the shared mapping, and the prefix of their IPv6 original
// destinations. The program writes no further than the slots in use: the
// geometry of g, which stays as it is while g is active and until it has
// been drained (see setSlots).
func (d *Datapath) region(g, cpu int) ([]flowTableSlot, [3]uint32) {
	start := d.regionStart(g, cpu)
	n := d.slots[g]
	return d.table[start : start+n], d.inflight[cpu].Orig6[g]
}

// drainTable appends the flows in the slots of idle table generation g to
// dst, reading the shared mappings: no syscall.
func (d *Datapath) drainTable(g int, dst *Drained) {
	epoch := d.epochs[g]
	// 8-byte aligned, as the keys keyHash reads in 64-bit words.
	var kb struct {
		_ [0]uint64
		k flowFlowKey
	}
	k := &kb.k
	for cpu := range d.nCPU {
		d.merge.startIndex(dst.Flows)
		region, prefix := d.region(g, cpu)
		for i := range region {
			if s := &region[i]; s.Epoch == epoch {
				slotKey(k, s, &prefix)
				if c := (flow.Counts{Bytes: s.St.Bytes, Packets: s.St.Packets}); !d.logSum.addExisting(k, c) {
					dst.Flows = d.merge.add(dst.Flows, k, c)
				}
			}
		}
	}
}

// keyHead is the part of a flowFlowKey a table slot holds whole: all but
// OrigDaddr (see table_slot in flow.c). The compiler checks that OrigDaddr
// comes last.
type keyHead = [len(flowTableSlot{}.Key)]byte

var _ [unsafe.Offsetof(flowFlowKey{}.OrigDaddr) - unsafe.Sizeof(keyHead{})]struct{}
var _ [unsafe.Sizeof(keyHead{}) - unsafe.Offsetof(flowFlowKey{}.OrigDaddr)]struct{}

// slotKey sets k to the key of the table slot s, whose generation's IPv6
// prefix on its CPU is prefix. The original destination address, when the
// flow has one, ends with the slot's last word, and starts with the
// prefix for IPv6 and as IPv4-mapped for IPv4 (table_slot in flow.c). The
// words are in memory order, as the program stored them.
func slotKey(k *flowFlowKey, s *flowTableSlot, prefix *[3]uint32) {
	*(*keyHead)(unsafe.Pointer(k)) = s.Key
	k.OrigDaddr = [16]byte{}
	switch {
	case k.Flags&uint8(flowFlowFlagFLOW_F_ORIG_DST) == 0:
		return
	case k.Flags&uint8(flowFlowFlagFLOW_F_IPV6) != 0:
		for i, w := range prefix {
			binary.LittleEndian.PutUint32(k.OrigDaddr[4*i:], w)
		}
	default: // IPv4-mapped, as the kernel's keys
		k.OrigDaddr[10], k.OrigDaddr[11] = 0xff, 0xff
	}
	binary.LittleEndian.PutUint32(k.OrigDaddr[12:], s.OrigDaddr4)
}

// drainMap empties an idle generation's hash map into dst, merging its
// flows with those of the table and the log.
func (d *Datapath) drainMap(m *ebpf.Map, dst *Drained) error {
	if d.keys == nil {
		d.keys = make([]flowFlowKey, drainBatch)
		d.vals = make([]flowFlowStats, drainBatch*d.nCPU)
	}
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookupAndDelete(&cursor, d.keys, d.vals, nil)
		if n > 0 {
			d.merge.startIndex(dst.Flows)
		}
		for i := range n {
			var c flow.Counts
			for _, v := range d.vals[i*d.nCPU : (i+1)*d.nCPU] {
				c.Bytes += v.Bytes
				c.Packets += v.Packets
			}
			if !d.logSum.addExisting(&d.keys[i], c) {
				dst.Flows = d.merge.add(dst.Flows, &d.keys[i], c)
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("draining flow generation: %w", err)
		}
	}
}

// readCounters turns the kernel's cumulative per-CPU counters into the
// increase since the previous drain.
func (d *Datapath) readCounters(dst *Drained) error {
	if d.cntVals == nil {
		d.cntVals = make([]flowFlowStats, d.nCPU)
	}
	for i := range NumReasons {
		if err := d.objs.Counters.Lookup(uint32(i), d.cntVals); err != nil {
			return fmt.Errorf("reading counter %s: %w", Reason(i), err)
		}
		var total flow.Counts
		for _, v := range d.cntVals {
			total.Bytes += v.Bytes
			total.Packets += v.Packets
		}
		dst.Uncounted[i] = flow.Counts{
			Bytes:   total.Bytes - d.lastCnt[i].Bytes,
			Packets: total.Packets - d.lastCnt[i].Packets,
		}
		d.lastCnt[i] = total
	}
	return nil
}

// convertKey turns the kernel's key into the shared flow model.
func convertKey(k *flowFlowKey) flow.Key {
	key := flow.Key{
		Src:       netip.AddrFrom16(k.Saddr).Unmap(),
		Dst:       netip.AddrFrom16(k.Daddr).Unmap(),
		Proto:     k.Proto,
		Port:      k.Port,
		PortIsDst: k.Flags&uint8(flowFlowFlagFLOW_F_PORT_DST) != 0,
	}
	if k.Flags&uint8(flowFlowFlagFLOW_F_ORIG_DST) != 0 {
		key.OrigDst = netip.AddrPortFrom(netip.AddrFrom16(k.OrigDaddr).Unmap(), k.OrigPort)
	}
	return key
}
