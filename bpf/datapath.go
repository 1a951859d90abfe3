//go:build linux

package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/netns"
)

// ErrNotSupported is returned when the running kernel lacks a program or
// map type the datapath needs. Callers test it with errors.Is.
var ErrNotSupported = errors.New("not supported by this kernel")

// Defaults, with the reason for each.
const (
	// DefaultMaxFlows bounds the hash map of each of the two flow
	// generations: where flows go that find no slot in the flow table.
	// 65,536 flows cost ~10 MiB per generation on a 64-CPU node (per-CPU
	// values) and cover a busy node for a 10 s flush interval.
	DefaultMaxFlows = 65536
	// DefaultTableSlots is the flow table's size per CPU and generation:
	// 8,192 slots of 64 bytes (512 KiB, 1 MiB per CPU for both
	// generations) keep a CPU that sees 4,000 flows per interval at half
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
	// drainBatch is the number of flows fetched per batch syscall. It
	// must exceed the largest hash bucket or the kernel answers ENOSPC.
	drainBatch = 4096
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

	// benchNewFlows makes every run count a new flow (benchmarks only).
	benchNewFlows bool
	// objectFile loads the programs from this bpf2go object instead of
	// the embedded one (benchmarks only: BenchmarkNetfilterObjects
	// compares builds in one process).
	objectFile string
}

// Validate reports the first invalid field, naming it.
func (c Config) Validate() error {
	if c.TableSlots != 0 && (c.TableSlots < 64 || c.TableSlots&(c.TableSlots-1) != 0) {
		return fmt.Errorf("flow table slots %d: must be a power of two, at least 64", c.TableSlots)
	}
	return nil
}

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
}

// Datapath owns the kernel objects of one loaded program set: the maps, the
// programs and the links attaching them. It is safe for concurrent use.
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
	// tableSlots its slots per CPU and generation; epochs the epoch of
	// each generation's slots in use.
	table      []flowTableSlot
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

// Load checks the kernel, sizes the maps from cfg and loads the programs.
// Nothing is attached yet.
func Load(cfg Config) (*Datapath, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.MaxFlows == 0 {
		cfg.MaxFlows = DefaultMaxFlows
	}
	if cfg.TableSlots == 0 {
		cfg.TableSlots = DefaultTableSlots
	}
	if err := checkKernel(); err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("removing memlock rlimit: %w", err)
	}
	var spec *ebpf.CollectionSpec
	var err error
	if cfg.objectFile != "" {
		spec, err = ebpf.LoadCollectionSpec(cfg.objectFile)
	} else {
		spec, err = loadFlow()
	}
	if err != nil {
		return nil, fmt.Errorf("loading datapath spec: %w", err)
	}
	for _, name := range []string{"flows_0", "flows_1"} {
		spec.Maps[name].MaxEntries = cfg.MaxFlows
	}
	spec.Maps["flow_maps"].InnerMap.MaxEntries = cfg.MaxFlows

	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("counting possible CPUs: %w", err)
	}
	// Both generations, every possible CPU.
	slots := 2 * ncpu * int(cfg.TableSlots)
	size := slots * int(unsafe.Sizeof(flowTableSlot{}))
	if size > MaxTableBytes {
		return nil, fmt.Errorf("flow table of %d slots per CPU: %d MiB for %d CPUs and 2 generations, more than the %d MiB allowed", cfg.TableSlots, size>>20, ncpu, MaxTableBytes>>20)
	}
	spec.Maps["flow_table"].MaxEntries = uint32(slots)
	vars, err := bssLayout(spec)
	if err != nil {
		return nil, err
	}
	if ncpu > vars.maxCPUs {
		return nil, fmt.Errorf("%d possible CPUs: the datapath supports at most %d", ncpu, vars.maxCPUs)
	}
	bench := uint32(0)
	if cfg.benchNewFlows {
		bench = 1
	}
	if err := spec.Variables["bench_new_flows"].Set(bench); err != nil {
		return nil, fmt.Errorf("setting bench_new_flows: %w", err)
	}
	d := &Datapath{nCPU: ncpu, tableSlots: int(cfg.TableSlots), epochs: [2]uint32{1, 2}}
	if err := spec.LoadAndAssign(&d.objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("loading datapath objects: %+v", ve)
		}
		return nil, fmt.Errorf("loading datapath objects: %w", err)
	}
	d.gens = [2]*ebpf.Map{d.objs.Flows0, d.objs.Flows1}
	if err := d.mapShared(vars); err != nil {
		d.closeObjects()
		return nil, err
	}
	for g, m := range d.gens {
		if err := d.objs.FlowMaps.Put(uint32(g), m); err != nil {
			d.closeObjects()
			return nil, fmt.Errorf("installing the hash map of flow generation %d: %w", g, err)
		}
	}
	d.publish(0)
	return d, nil
}

// mapShared maps the flow table (read only) and the program's .bss
// (read-write: user space switches each CPU's generation and writes the
// local prefixes) into this process; vars says where in .bss the
// in-flight lines and the prefixes are.
func (d *Datapath) mapShared(vars bssVars) error {
	table, err := mapArray(d.objs.FlowTable, unix.PROT_READ)
	if err != nil {
		return fmt.Errorf("mapping the flow table: %w", err)
	}
	d.mems = append(d.mems, table)
	d.table = unsafe.Slice((*flowTableSlot)(unsafe.Pointer(&table[0])), d.objs.FlowTable.MaxEntries())
	bss, err := mapArray(d.objs.Bss, unix.PROT_READ|unix.PROT_WRITE)
	if err != nil {
		return fmt.Errorf("mapping the program's globals: %w", err)
	}
	d.mems = append(d.mems, bss)
	d.inflight = unsafe.Slice((*flowCpuInflight)(unsafe.Pointer(&bss[vars.inflight])), d.nCPU)
	d.prefixes = (*flowPrefixState)(unsafe.Pointer(&bss[vars.prefixes]))
	// The table's geometry, before any program runs (see flow_table).
	for cpu := range d.inflight {
		l := &d.inflight[cpu]
		l.Shift = uint32(64 - bits.TrailingZeros(uint(d.tableSlots)))
		l.Mask = uint32(d.tableSlots - 1)
		for g := range l.Base {
			l.Base[g] = uint32(d.regionStart(g, cpu))
		}
	}
	return nil
}

// objects are the generated objects and the .bss map, which holds the
// globals user space shares with the programs (inflight, local_prefixes).
type objects struct {
	flowObjects
	Bss *ebpf.Map `ebpf:".bss"`
}

// bssVars is where the shared globals sit in .bss, from the object's BTF.
type bssVars struct {
	inflight, prefixes uint32
	// maxCPUs is the length of inflight (MAX_CPUS in flow.c).
	maxCPUs int
}

// bssLayout finds the shared globals in the .bss section and checks their
// sizes against the generated Go types, so that a change on either side
// is an error at load, not memory read at the wrong place.
func bssLayout(spec *ebpf.CollectionSpec) (bssVars, error) {
	var v bssVars
	ms, ok := spec.Maps[".bss"]
	if !ok {
		return v, errors.New("datapath object has no .bss section")
	}
	ds, ok := ms.Value.(*btf.Datasec)
	if !ok {
		return v, fmt.Errorf("datapath .bss: value type %T, want a datasec", ms.Value)
	}
	found := 0
	for _, vs := range ds.Vars {
		switch vs.Type.TypeName() {
		case "inflight":
			line := uint32(unsafe.Sizeof(flowCpuInflight{}))
			if vs.Size%line != 0 || vs.Offset%line != 0 {
				return v, fmt.Errorf("datapath .bss: inflight is %d bytes at %d, want whole %d-byte lines", vs.Size, vs.Offset, line)
			}
			v.inflight, v.maxCPUs = vs.Offset, int(vs.Size/line)
			found++
		case "local_prefixes":
			if want := uint32(unsafe.Sizeof(flowPrefixState{})); vs.Size != want {
				return v, fmt.Errorf("datapath .bss: local_prefixes is %d bytes, want %d", vs.Size, want)
			}
			v.prefixes = vs.Offset
			found++
		}
	}
	if found != 2 {
		return v, errors.New("datapath .bss: inflight or local_prefixes missing")
	}
	return v, nil
}

// mapArray maps the values of a BPF_F_MMAPABLE array into this process.
func mapArray(m *ebpf.Map, prot int) ([]byte, error) {
	size := int(m.MaxEntries()) * int(m.ValueSize())
	page := os.Getpagesize()
	mem, err := unix.Mmap(m.FD(), 0, (size+page-1)&^(page-1), prot, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%d KiB: %w", size>>10, err)
	}
	return mem, nil
}

// ErrPermission is returned when the process may not load BPF programs.
var ErrPermission = errors.New("loading eBPF needs root or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON")

// checkKernel turns a missing program or map type into ErrNotSupported with
// the name of what is missing, instead of a verifier error.
func checkKernel() error { return checkFeatures(features.HaveProgramType, features.HaveMapType) }

// checkFeatures is checkKernel with the kernel probes passed in, so a test
// can play a kernel that lacks a feature. The errors wrap both our sentinel
// and the probe's error (e.g. ebpf.ErrNotSupported, unix.EPERM).
func checkFeatures(haveProg func(ebpf.ProgramType) error, haveMap func(ebpf.MapType) error) error {
	for _, pt := range []ebpf.ProgramType{ebpf.Netfilter, ebpf.CGroupSKB} {
		err := haveProg(pt)
		if errors.Is(err, unix.EPERM) {
			return fmt.Errorf("%w: %w", ErrPermission, err)
		}
		if err != nil {
			return fmt.Errorf("program type %s: %w (%w)", pt, ErrNotSupported, err)
		}
	}
	for _, mt := range []ebpf.MapType{ebpf.PerCPUHash, ebpf.ArrayOfMaps, ebpf.PerCPUArray} {
		if err := haveMap(mt); err != nil {
			return fmt.Errorf("map type %s: %w (%w)", mt, ErrNotSupported, err)
		}
	}
	return nil
}

// AttachNetfilter attaches the netfilter program at POSTROUTING for IPv4 and
// IPv6 in the network namespace at nsPath ("" for the current one). Links
// are per namespace: a hook in the root namespace sees nothing of another.
func (d *Datapath) AttachNetfilter(nsPath string, priority int32) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("attaching netfilter: datapath closed")
	}
	return netns.Do(nsPath, func() error {
		for _, pf := range []link.NetfilterProtocolFamily{link.NetfilterProtoIPv4, link.NetfilterProtoIPv6} {
			l, err := link.AttachNetfilter(link.NetfilterOptions{
				Program:        d.objs.KznNetfilter,
				ProtocolFamily: pf,
				Hook:           link.NetfilterInetPostRouting,
				Priority:       priority,
			})
			if errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("attaching netfilter postrouting (family %d): priority %d is taken by another hook, which the kernel does not allow for BPF hooks: choose another priority below 100: %w", pf, priority, err)
			}
			if err != nil {
				return fmt.Errorf("attaching netfilter postrouting (family %d, priority %d): %w", pf, priority, err)
			}
			d.links = append(d.links, l)
		}
		return nil
	})
}

// CgroupV2Mount finds the mount point of the cgroup v2 hierarchy (for
// example /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts): the
// root to attach the cgroup_skb program to, so that every socket is seen.
func CgroupV2Mount() (string, error) {
	mounts, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "", fmt.Errorf("finding the cgroup v2 mount: %w", err)
	}
	for _, line := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[2] == "cgroup2" {
			return f[1], nil
		}
	}
	return "", errors.New("no cgroup v2 hierarchy mounted: set --cgroup-path or use --attach-mode=netfilter")
}

// AttachCgroup attaches the cgroup_skb egress program to the cgroup v2
// directory at path (normally the root of the hierarchy, so that every
// socket on the node is seen).
func (d *Datapath) AttachCgroup(path string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("attaching cgroup: datapath closed")
	}
	l, err := link.AttachCgroup(link.CgroupOptions{
		Path:    path,
		Attach:  ebpf.AttachCGroupInetEgress,
		Program: d.objs.KznCgroupEgress,
	})
	if err != nil {
		return fmt.Errorf("attaching cgroup_skb egress to %s: %w", path, err)
	}
	d.links = append(d.links, l)
	return nil
}

// SetLocalPrefixes replaces the set of prefixes whose sources are counted
// (IPv4 and IPv6 mixed, at most MaxLocalPrefixes). The new set is written
// to the idle slot and then made active with one write, so a packet is
// always checked against a complete set, old or new.
func (d *Datapath) SetLocalPrefixes(prefixes []netip.Prefix) error {
	if len(prefixes) > MaxLocalPrefixes {
		return fmt.Errorf("setting local prefixes: %d prefixes, at most %d supported", len(prefixes), MaxLocalPrefixes)
	}
	var set flowPrefixSet
	for i, p := range prefixes {
		if !p.IsValid() {
			return fmt.Errorf("setting local prefixes: invalid prefix %q", p.String())
		}
		p = p.Masked()
		bits := p.Bits()
		if p.Addr().Is4() {
			bits += 96
		}
		addr := p.Addr().As16()
		var m [16]byte
		for b := range bits {
			m[b/8] |= 0x80 >> (b % 8)
		}
		set.Prefixes[i].Addr = [2]uint64{binary.NativeEndian.Uint64(addr[:8]), binary.NativeEndian.Uint64(addr[8:])}
		set.Prefixes[i].Mask = [2]uint64{binary.NativeEndian.Uint64(m[:8]), binary.NativeEndian.Uint64(m[8:])}
	}
	set.Count = uint32(len(prefixes))
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("setting local prefixes: datapath closed")
	}
	// Fill the idle set through the shared mapping, then flip active
	// with an atomic store (a release: the set is visible first). No
	// program reads the idle set: the previous call waited for the last
	// reader of what was then the old set.
	lp := d.prefixes
	idle := 1 - atomic.LoadUint32(&lp.Active)
	lp.Sets[idle] = set
	atomic.StoreUint32(&lp.Active, idle)
	// Wait until no program can still be reading the old set before it
	// may be overwritten by the next call: re-putting a generation's hash
	// map is a map-in-map update, which returns after an RCU grace period
	// (maybe_wait_bpf_programs in kernel/bpf/syscall.c). Prefixes change
	// rarely; a drain, which runs every flush, does not pay for this.
	if err := d.objs.FlowMaps.Put(uint32(0), d.gens[0]); err != nil {
		return fmt.Errorf("waiting for readers of the old prefixes: %w", err)
	}
	return nil
}

// Drain swaps the flow generations and returns everything counted in the
// generation that was active, appending flows to dst.Flows[:0].
//
// It loses nothing: after switching the generation it waits until it has seen
// every CPU's in-flight counter at zero, so every program instance that
// could still write to the old generation has finished before it is read
// and emptied (the protocol is in flow.c, above account()). The wait is
// normally a load per CPU: an instance is short (its cost per packet is in
// BENCHMARKS.md), so a drain rarely finds one still running.
func (d *Datapath) Drain(dst *Drained) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("draining: datapath closed")
	}
	dst.Flows = dst.Flows[:0]
	old := d.active
	next := 1 - old
	d.publish(next)
	dst.Waited = d.waitQuiescent()
	d.active = next
	d.merge.reset()
	d.drainTable(old, dst)
	if err := d.drainMap(d.gens[old], dst); err != nil {
		return err
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
// zero after the last publish, and how long that took when it was not at
// once. A counter stays non-zero only while an instance runs, or is
// preempted in process context: then it yields and looks again.
func (d *Datapath) waitQuiescent() time.Duration {
	var start time.Time
	for cpu := range d.inflight {
		n := &d.inflight[cpu].N
		for spins := 0; atomic.LoadUint32(n) != 0; spins++ {
			if start.IsZero() {
				start = time.Now()
			}
			if spins < 64 {
				continue
			}
			time.Sleep(20 * time.Microsecond)
		}
	}
	if start.IsZero() {
		return 0
	}
	return time.Since(start)
}

// regionStart is the index in the flow table of the first slot of cpu's
// region in generation g.
func (d *Datapath) regionStart(g, cpu int) int {
	return (g*d.nCPU + cpu) * d.tableSlots
}

// region is cpu's region of generation g, read through the shared mapping.
func (d *Datapath) region(g, cpu int) []flowTableSlot {
	start := d.regionStart(g, cpu)
	return d.table[start : start+d.tableSlots]
}

// drainTable appends the flows in the slots of idle table generation g to
// dst, reading the shared mapping: no syscall, no copy.
func (d *Datapath) drainTable(g int, dst *Drained) {
	epoch := d.epochs[g]
	for cpu := range d.nCPU {
		d.merge.startIndex(dst.Flows)
		region := d.region(g, cpu)
		for i := range region {
			if s := &region[i]; s.Epoch == epoch {
				dst.Flows = d.merge.add(dst.Flows, &s.Key, flow.Counts{Bytes: s.St.Bytes, Packets: s.St.Packets})
			}
		}
	}
}

// drainMap empties an idle generation's hash map into dst, merging its
// flows with those of the table.
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
			dst.Flows = d.merge.add(dst.Flows, &d.keys[i], c)
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
	return flow.Key{
		Src:       netip.AddrFrom16(k.Saddr).Unmap(),
		Dst:       netip.AddrFrom16(k.Daddr).Unmap(),
		Proto:     k.Proto,
		Port:      k.Port,
		PortIsDst: k.Flags&uint8(flowFlowFlagFLOW_F_PORT_DST) != 0,
	}
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

// RunPacket runs the netfilter program once on an L3 packet as if the hook
// had seen it (BPF_PROG_TEST_RUN, exactly once). Tests and benchmarks use
// it to produce known counts without a network; the agent never calls it.
func (d *Datapath) RunPacket(pkt []byte) error {
	d.mu.Lock()
	prog := d.objs.KznNetfilter
	closed := d.closed
	d.mu.Unlock()
	if closed {
		return errors.New("running packet: datapath closed")
	}
	// The test run builds an skb without a link-layer header only at
	// LOCAL_OUT; the program reads the family from the hook state.
	hook := struct{ Hook, PF uint8 }{Hook: 3, PF: 2}
	if len(pkt) > 0 && pkt[0]>>4 == 6 {
		hook.PF = 10
	}
	ret, err := prog.Run(&ebpf.RunOptions{Data: pkt, Context: hook})
	if err != nil {
		return fmt.Errorf("running packet: %w", err)
	}
	if ret != 1 {
		return fmt.Errorf("running packet: program returned %d, want NF_ACCEPT", ret)
	}
	return nil
}
