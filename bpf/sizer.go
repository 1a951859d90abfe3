package bpf

import (
	"math/bits"
	"slices"
)

// How the flow table sizes itself, with the reason for each number.
const (
	// tableStartSlots is the slots in use per CPU region before any
	// flow has been seen: the largest region, room for 2,048 flows a CPU
	// per interval.
	tableStartSlots = MaxTableSlots
	// tableFloorSlots is the fewest slots in use a quiet node shrinks
	// to: the drain reads every slot in use, so an idle node reads 64 KiB
	// a CPU, and a burst of new flows spills for one interval only.
	tableFloorSlots = 1024
	// tableHeadroom is the slots per flow seen: at half load linear
	// probing nearly always finds a flow, or a free slot, at once.
	tableHeadroom = 2
	// tableShrinkAfter is how many drains a smaller size must suffice
	// for before the table shrinks to it: a burst every few intervals
	// keeps its room, and the table does not flap.
	tableShrinkAfter = 5
)

// tableSizer chooses the slots in use per CPU region for each turn of a
// generation, from the flows per CPU of the latest intervals. It grows at
// once to what the busiest CPU of the last interval needed, and shrinks
// only once tableShrinkAfter intervals in a row needed less. It is plain
// arithmetic: the drain feeds it the kernel's counts and the log's (counts).
type tableSizer struct {
	// floor and max bound the slots in use; max is the region's length.
	floor, max int
	// wants are the sizes the latest intervals asked for, a ring; next
	// is where the next goes.
	wants [tableShrinkAfter]int
	next  int
	// spilled are each CPU's cumulative spills (see cpu_inflight in
	// flow.c) read at the previous drain.
	spilled []uint32
}

// newTableSizer returns a sizer for regions of max slots on ncpu CPUs,
// starting at min(tableStartSlots, max).
func newTableSizer(max, ncpu int) tableSizer {
	s := tableSizer{
		floor:   min(tableFloorSlots, max),
		max:     max,
		spilled: make([]uint32, ncpu),
	}
	for i := range s.wants {
		s.wants[i] = s.start()
	}
	return s
}

// start is the size of both generations at load.
func (s *tableSizer) start() int { return min(tableStartSlots, s.max) }

// observe records that the busiest CPU of the latest interval counted
// flows flows (in the table and in the hash map), and returns the slots
// to use in the next turn of a generation: a power of two at least
// tableHeadroom times the largest count of the last tableShrinkAfter
// intervals, within [floor, max].
func (s *tableSizer) observe(flows int) int {
	want := s.max
	if need := tableHeadroom * flows; need <= s.max {
		want = max(s.floor, 1<<bits.Len(uint(max(need, 1)-1)))
	}
	s.wants[s.next] = want
	s.next = (s.next + 1) % len(s.wants)
	return slices.Max(s.wants[:])
}

// counts returns the flows the busiest CPU counted in the generation in
// use, and the flows all CPUs counted in the hash map for want of room
// since the previous call. A CPU's flows are those its table region took
// (room0, half the region's slots in use, less the room it has left),
// those the log read first from that CPU (logged), and its spills (the
// kernel's cumulative count: it wraps, and differences of uint32 stay
// right).
func (s *tableSizer) counts(room0 int, room, spilled func(cpu int) uint32, logged func(cpu int) int) (busiest, spills int) {
	for cpu := range s.spilled {
		sp := spilled(cpu)
		n := int(sp - s.spilled[cpu])
		busiest = max(busiest, room0-int(room(cpu))+logged(cpu)+n)
		spills += n
		s.spilled[cpu] = sp
	}
	return busiest, spills
}
