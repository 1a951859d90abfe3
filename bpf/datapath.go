//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kubezonnet/kubezonnet/internal/flow"
)

// ErrNotSupported is returned when the running kernel lacks a program or
// map type the datapath needs. Callers test it with errors.Is.
var ErrNotSupported = errors.New("not supported by this kernel")

// ErrSocketHookTaken is wrapped by AttachCgroup's error when a cgroup
// socket hook holds a program that admits no other (attached without
// BPF_F_ALLOW_MULTI): the datapath counts every flow, but flows whose
// destination a socket load balancer rewrote at that hook carry no
// original destination.
var ErrSocketHookTaken = errors.New("a cgroup socket hook admits no other program: no original destinations from socket load balancing")

// ErrPermission is returned when the process may not load BPF programs.
var ErrPermission = errors.New("loading eBPF needs root or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON")

// Defaults, with the reason for each.
const (
	// DefaultMaxFlows bounds the hash map of each of the two flow
	// generations: where flows go that find no slot in the flow table.
	// 65,536 flows cost ~10 MiB per generation on a 64-CPU node (per-CPU
	// values) and cover a busy node for a 10 s flush interval.
	DefaultMaxFlows = 65536
	// DefaultTableMemory bounds the flow table: both generations, every
	// possible CPU, 64 bytes a slot. 64 MiB gives each CPU the largest
	// region (MaxTableSlots) up to 4 CPUs, 8,192 slots on 64 CPUs, and
	// still 2,048 slots a CPU on 192 CPUs, where the flows of a node are
	// spread over many CPUs. The table takes all of it at load, whatever
	// the traffic.
	DefaultTableMemory = 64 << 20
	// MaxTableSlots caps a CPU's region per generation: 131,072 slots
	// hold ~65,000 flows a CPU per flush interval at half load. Larger
	// regions would only cost memory and drain time.
	MaxTableSlots = 1 << 17
	// MinTableSlots is the smallest region a CPU may be given: the table
	// is refused when the memory bound cannot give every CPU this many.
	MinTableSlots = 64
	// MaxTableBytes bounds the whole flow table (both generations, every
	// CPU): the kernel caps an array map just under 4 GiB.
	MaxTableBytes = 2 << 30
	// MaxLocalPrefixes is how many local prefixes the kernel scans (fixed
	// in flow.c): a node has a handful of pod CIDRs and addresses.
	MaxLocalPrefixes = len(flowPrefixSet{}.Prefixes)
	// DefaultNetfilterPriority is the last priority before source NAT
	// (NF_IP_PRI_NAT_SRC = 100): filter chains have run, so dropped
	// packets are not counted, and the pre-SNAT pod address is still seen.
	DefaultNetfilterPriority = 99
)

// Reason says why bytes were not counted in a flow.
type Reason int

// The reasons, in the order of the kernel's enum counter.
const (
	// ReasonMapFull: the flow map of the generation was full.
	ReasonMapFull Reason = Reason(flowCounterCOUNTER_MAP_FULL)
	// ReasonMapError: the kernel refused the insert for another reason.
	ReasonMapError Reason = Reason(flowCounterCOUNTER_MAP_ERROR)
	// ReasonParseError: the IP or L4 header could not be read.
	ReasonParseError Reason = Reason(flowCounterCOUNTER_PARSE_ERROR)
	// ReasonNotLocal is not a loss: the source belongs to another node,
	// whose agent counts it. Reported for visibility.
	ReasonNotLocal Reason = Reason(flowCounterCOUNTER_NOT_LOCAL)
	// ReasonNoMap: a map lookup that cannot fail failed (a bug if
	// non-zero).
	ReasonNoMap Reason = Reason(flowCounterCOUNTER_NO_MAP)
	// NumReasons is the number of reasons.
	NumReasons = int(flowCounterCOUNTER_MAX)
)

// String returns the label value used for the reason in metrics.
func (r Reason) String() string {
	switch r {
	case ReasonMapFull:
		return "map_full"
	case ReasonMapError:
		return "map_error"
	case ReasonParseError:
		return "parse_error"
	case ReasonNotLocal:
		return "not_local"
	case ReasonNoMap:
		return "no_map"
	}
	return fmt.Sprintf("reason_%d", int(r))
}

// Config sizes the datapath. Zero values take the defaults.
type Config struct {
	// MaxFlows is the capacity of each generation's hash map.
	MaxFlows uint32
	// TableMemory bounds the flow table in bytes (both generations,
	// every possible CPU, see TableSlots). How much of it is used is
	// chosen at every drain from the flows seen (see Drain).
	TableMemory uint64
}

// Validate reports the first invalid field, naming it. Whether TableMemory
// is large enough depends on the CPU count: Load checks it (TableSlots).
func (c Config) Validate() error {
	if c.TableMemory > MaxTableBytes {
		return fmt.Errorf("flow table memory %d MiB: more than the %d MiB allowed", c.TableMemory>>20, MaxTableBytes>>20)
	}
	return nil
}

// TableSlots returns the slots of each CPU's region of the flow table per
// generation that a table of at most memory bytes gives on a node with
// ncpu possible CPUs: the largest power of two that fits, at most
// MaxTableSlots. It fails when that is fewer than MinTableSlots.
func TableSlots(memory uint64, ncpu int) (int, error) {
	perSlot := uint64(2*ncpu) * tableSlotBytes
	n := memory / perSlot
	if n < MinTableSlots {
		return 0, fmt.Errorf("flow table memory %s: %d possible CPUs need at least %s for %d slots per CPU (2 generations of %d-byte slots)", formatBytes(memory), ncpu, formatBytes(MinTableSlots*perSlot), MinTableSlots, tableSlotBytes)
	}
	return int(min(MaxTableSlots, uint64(1)<<(bits.Len64(n)-1))), nil
}

// tableSlotBytes is the memory of one slot: its flow_table entry.
const tableSlotBytes = uint64(unsafe.Sizeof(flowTableSlot{}))

// formatBytes writes a size in the largest of MiB, KiB and bytes that
// states it exactly.
func formatBytes(n uint64) string {
	switch {
	case n != 0 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n != 0 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}

// Datapath owns the kernel objects of one loaded program set: the maps, the
// programs and the links attaching them. It is safe for concurrent use.
//
// Its methods are spread over the files of the package by concept: Load
// (load.go), AttachNetfilter and AttachCgroup (attach.go),
// SetLocalPrefixes (prefixes.go), Drain (drain.go) and Close (here).
type Datapath struct {
	mu     sync.Mutex
	objs   objects
	gens   [2]*ebpf.Map
	active int
	links  []link.Link
	// prefixes is the program's local_prefixes, mapped into this
	// process (see SetLocalPrefixes).
	prefixes *flowPrefixState
	// table is the flow table mapped into this process (read only);
	// regionSlots the length of each CPU's region per generation; slots
	// the slots in use in each generation's regions (see sizer); epochs
	// the epoch of each generation's slots in use.
	table       []flowTableSlot
	regionSlots int
	slots       [2]int
	sizer       tableSizer
	epochs      [2]uint32
	// inflight holds each CPU's count of program instances in flight and
	// its active generation, mapped into this process (see Drain).
	inflight []flowCpuInflight
	// mems are the shared mappings, unmapped at close.
	mems    [][]byte
	merge   merger
	lastCnt [NumReasons]flow.Counts
	nCPU    int
	keys    []flowFlowKey
	vals    []flowFlowStats
	cntVals []flowFlowStats
	closed  bool
}

// Close detaches every link, in reverse order of attachment, then closes
// the programs and maps. Counts not drained yet are lost: drain first.
func (d *Datapath) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	for i := len(d.links) - 1; i >= 0; i-- {
		if err := d.links[i].Close(); err != nil {
			errs = append(errs, fmt.Errorf("detaching link %d: %w", i, err))
		}
	}
	d.links = nil
	if err := d.closeObjects(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// closeObjects unmaps the shared mappings, then closes the programs and
// maps.
func (d *Datapath) closeObjects() error {
	var errs []error
	d.table, d.inflight, d.prefixes = nil, nil, nil
	for _, mem := range d.mems {
		if err := unix.Munmap(mem); err != nil {
			errs = append(errs, fmt.Errorf("unmapping a shared map: %w", err))
		}
	}
	d.mems = nil
	if err := d.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("closing objects: %w", err))
	}
	return errors.Join(errs...)
}
