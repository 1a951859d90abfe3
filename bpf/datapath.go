//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"sync"

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
	// DefaultTableSlots is the flow table's size per CPU and generation:
	// 8,192 slots of 64 bytes, each with 16 bytes for an IPv6 flow's
	// original destination address (640 KiB, 1.25 MiB per CPU for both
	// generations), keep a CPU that sees 4,000 flows per interval at half
	// load, where linear probing almost always finds a slot at once.
	DefaultTableSlots = 8192
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
	// TableSlots is the flow table's number of slots per CPU and
	// generation, a power of two.
	TableSlots uint32
}

// Validate reports the first invalid field, naming it.
func (c Config) Validate() error {
	if c.TableSlots != 0 && (c.TableSlots < 64 || c.TableSlots&(c.TableSlots-1) != 0) {
		return fmt.Errorf("flow table slots %d: must be a power of two, at least 64", c.TableSlots)
	}
	return nil
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
	// table is the flow table mapped into this process (read only),
	// orig the IPv6 original destination addresses of its slots
	// (flow_orig, same indexes); tableSlots its slots per CPU and generation; epochs
	// the epoch of each generation's slots in use.
	table      []flowTableSlot
	orig       []flowOrigSlot
	tableSlots int
	epochs     [2]uint32
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
	d.table, d.orig, d.inflight, d.prefixes = nil, nil, nil, nil
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
