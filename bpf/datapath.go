//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"time"
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
	// DefaultTableMemory bounds the flow table and the flow log: both
	// generations of the table and the log's ring, every possible CPU,
	// 64 bytes a slot (and a byte for its tag) or record (see
	// TableGeometry). 64 MiB gives each CPU the largest region
	// (MaxTableSlots) and ring (MaxLogRecords) up to 3 CPUs; 4,096 slots
	// and 4,096 records on 64 CPUs; 1,024 slots and 2,048 records on 192
	// CPUs, where the flows and packets of a node are spread over many
	// CPUs. All of it is taken at load, whatever the traffic.
	DefaultTableMemory = 64 << 20
	// MaxTableSlots caps a CPU's region per generation: 4,096 slots
	// (256 KiB) hold 2,048 flows a CPU per interval, and stay in a core's
	// own cache beside the network stack's lines. A larger region holds
	// more flows but costs a cache miss, often a TLB miss, on every packet
	// once the flows outgrow the caches: the flows beyond go to the log
	// instead (flow_log in flow.c). Measured with `make traffic` at
	// 32,000 new flows a second, the program's own time per packet was
	// lowest with 2,048 and 4,096 slots, higher with 8,192, and highest
	// with the 131,072 slots twice the flows would take (BENCHMARKS.md,
	// "Agent on real traffic").
	MaxTableSlots = 1 << 12
	// MinTableSlots is the smallest region a CPU may be given: the table
	// is refused when the memory bound cannot give every CPU this many.
	MinTableSlots = 64
	// MaxLogRecords caps a CPU's ring of the flow log: 262,144 records
	// (16 MiB) hold 0.26 s of a CPU's packets at 1M packets a second,
	// against a read every LogPollMax at most.
	MaxLogRecords = 1 << 18
	// LogPollMin and LogPollMax bound the wait between two reads of the
	// flow log, which adapts to how full the rings are (see pollLoop):
	// at the shortest, a ring of 2,048 records (192 CPUs, the default
	// memory) fills only beyond 2M packets a second on its CPU; at the
	// longest, a node whose flows fit the table wakes ten times a second
	// to look, and a ring of MaxLogRecords fills only beyond 2.6M. A
	// burst faster than the wait has adapted to goes to the hash map
	// until it has.
	LogPollMin = time.Millisecond
	LogPollMax = 100 * time.Millisecond
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
	// TableMemory bounds the flow table and the flow log in bytes (both
	// generations, every possible CPU, see TableGeometry). How much of
	// the table is used is chosen at every drain from the flows seen (see
	// Drain).
	TableMemory uint64
}

// Validate reports the first invalid field, naming it. Whether TableMemory
// is large enough depends on the CPU count: Load checks it (TableGeometry).
func (c Config) Validate() error {
	if c.TableMemory > MaxTableBytes {
		return fmt.Errorf("flow table memory %d MiB: more than the %d MiB allowed", c.TableMemory>>20, MaxTableBytes>>20)
	}
	return nil
}

// TableGeometry returns what memory bytes give each of ncpu possible CPUs:
// the slots of its flow table region per generation, and the records of
// its ring of the flow log. Half of a CPU's share goes to the table's two
// generations, the largest power of two of slots that fits, at most
// MaxTableSlots; the rest, but for the slots' tags (a byte each), to the
// ring, the largest power of two of records that fits, at most
// MaxLogRecords. It fails when a share cannot hold MinTableSlots in two
// generations and a ring of as many records.
func TableGeometry(memory uint64, ncpu int) (slots, records int, err error) {
	// The smallest share: its table half holds MinTableSlots in two
	// generations, its other half their tags and a ring of
	// MinTableSlots records.
	const least = 4 * MinTableSlots * tableSlotBytes
	share := memory / uint64(ncpu)
	if share < least {
		return 0, 0, fmt.Errorf("flow table memory %s: %d possible CPUs need at least %s (per CPU %d slots in 2 generations, %d bytes each with its tag, and %d log records of %d bytes)", formatBytes(memory), ncpu, formatBytes(uint64(ncpu)*least), MinTableSlots, tableSlotBytes+tagBytes, MinTableSlots, logRecordBytes)
	}
	slots = int(min(MaxTableSlots, uint64(1)<<(bits.Len64(share/2/(2*tableSlotBytes))-1)))
	r := (share - 2*uint64(slots)*(tableSlotBytes+tagBytes)) / logRecordBytes
	records = int(min(MaxLogRecords, uint64(1)<<(bits.Len64(r)-1)))
	return slots, records, nil
}

// tableSlotBytes is the memory of one slot: its flow_table entry; tagBytes
// that of its tag in flow_tags; logRecordBytes that of one record of the
// flow log.
const (
	tableSlotBytes = uint64(unsafe.Sizeof(flowTableSlot{}))
	tagBytes       = 1
	logRecordBytes = uint64(unsafe.Sizeof(flowLogRec{}))
)

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
	// table is the flow table mapped into this process (read only), and
	// tags its slots' tags (read-write, a byte per slot at the slot's
	// index); regionSlots the length of each CPU's region per generation;
	// slots the slots in use in each generation's regions (see sizer);
	// epochs the epoch of each generation's slots in use.
	table       []flowTableSlot
	tags        []byte
	regionSlots int
	slots       [2]int
	sizer       tableSizer
	epochs      [2]uint32
	// inflight holds each CPU's count of program instances in flight and
	// its active generation, mapped into this process (see Drain).
	inflight []flowCpuInflight
	// log is the flow log mapped into this process (read only), a ring
	// of 1<<logShift records per CPU; logs each CPU's ring positions and
	// table room (in .bss). logSum adds up the flows read from the log
	// since the last drain, at most maxLogFlows; logged counts the
	// records, and logNew per CPU the flows first read from it (for the
	// sizer); heads is where a drain reads each ring up to (see
	// takeLog). stop ends the goroutine that reads the log, which closes
	// polled when it returns.
	log         []flowLogRec
	logs        []flowLogLine
	logShift    uint
	logSum      logSum
	logged      int
	logNew      []int
	maxLogFlows int
	heads       []uint32
	stop        chan struct{}
	polled      chan struct{}
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
	// The log's reader takes d.mu for each read: it returns at its next
	// read, which finds closed set.
	close(d.stop)
	d.mu.Unlock()
	<-d.polled
	d.mu.Lock()
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
	d.table, d.inflight, d.prefixes, d.log, d.logs = nil, nil, nil, nil, nil
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
