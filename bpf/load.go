//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"math/bits"
	"os"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// bssSection is the data section of the globals user space shares with the
// programs (inflight, local_prefixes): the section the compiler puts
// zero-initialised globals in.
const bssSection = ".bss"

// objects are the generated objects and the .bss map, which holds the
// globals user space shares with the programs.
//
// Hand-written, and why: the drain protocol (flow.c, above account()) and
// SetLocalPrefixes need atomic loads and stores on these globals while
// programs run. The generated variables (flowObjects.Inflight,
// .LocalPrefixes) only offer Get and Set, which copy bytes without atomics,
// and ebpf.VariablePointer, which would give a typed pointer into the shared
// memory, works only in binaries built with the
// ebpf_unsafe_memory_experiment tag (without it, it fails at run time). So
// the .bss map itself, for which bpf2go emits no field, is assigned here by
// its section name and mapped by mapShared; where the variables sit in it
// comes from the generated variable specs (bssLayout), not from a walk of
// the BTF.
type objects struct {
	flowObjects
	Bss *ebpf.Map `ebpf:".bss"`
}

// Load checks the kernel, sizes the maps from cfg and loads the programs.
// Nothing is attached yet.
func Load(cfg Config) (*Datapath, error) {
	return load(cfg, loadFlow)
}

// load is Load with the source of the collection spec passed in: the
// embedded object (loadFlow) for Load, a variant of it in benchmarks
// (export_test.go).
func load(cfg Config, loadSpec func() (*ebpf.CollectionSpec, error)) (*Datapath, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.MaxFlows == 0 {
		cfg.MaxFlows = DefaultMaxFlows
	}
	if cfg.TableMemory == 0 {
		cfg.TableMemory = DefaultTableMemory
	}
	if err := checkKernel(); err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("removing memlock rlimit: %w", err)
	}
	spec, err := loadSpec()
	if err != nil {
		return nil, fmt.Errorf("loading datapath spec: %w", err)
	}
	var specs flowSpecs
	if err := spec.Assign(&specs); err != nil {
		return nil, fmt.Errorf("loading datapath spec: %w", err)
	}
	specs.Flows0.MaxEntries = cfg.MaxFlows
	specs.Flows1.MaxEntries = cfg.MaxFlows
	specs.FlowMaps.InnerMap.MaxEntries = cfg.MaxFlows

	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("counting possible CPUs: %w", err)
	}
	region, records, err := TableGeometry(cfg.TableMemory, ncpu)
	if err != nil {
		return nil, err
	}
	// Both generations, every possible CPU, each region as long as it may
	// ever be; a ring of the log per possible CPU.
	specs.FlowTable.MaxEntries = uint32(2 * ncpu * region)
	specs.FlowTags.MaxEntries = specs.FlowTable.MaxEntries / 8
	specs.FlowLog.MaxEntries = uint32(ncpu * records)
	logShift := bits.TrailingZeros(uint(records))
	if err := specs.LogShift.Set(uint32(logShift)); err != nil {
		return nil, fmt.Errorf("setting the flow log's length: %w", err)
	}
	vars, err := bssLayout(specs.Inflight, specs.LocalPrefixes, specs.Logs)
	if err != nil {
		return nil, err
	}
	if ncpu > vars.maxCPUs {
		return nil, fmt.Errorf("%d possible CPUs: the datapath supports at most %d", ncpu, vars.maxCPUs)
	}
	d := &Datapath{
		nCPU: ncpu, regionSlots: region, sizer: newTableSizer(region, ncpu), epochs: [2]uint32{1, 2},
		logShift: uint(logShift), maxLogFlows: int(cfg.MaxFlows), logNew: make([]int, ncpu),
		stop: make(chan struct{}), polled: make(chan struct{}),
	}
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
	go d.pollLoop()
	return d, nil
}

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

// bssVars is where the shared globals sit in .bss.
type bssVars struct {
	inflight, prefixes, logs uint32
	// maxCPUs is the length of inflight and logs (MAX_CPUS in flow.c).
	maxCPUs int
}

// bssLayout reads where the shared globals sit in .bss from their generated
// variable specs, and checks their sizes against the generated Go types, so
// that a change on either side is an error at load, not memory read at the
// wrong place.
func bssLayout(inflight, prefixes, logs *ebpf.VariableSpec) (bssVars, error) {
	var v bssVars
	for _, vs := range []*ebpf.VariableSpec{inflight, prefixes, logs} {
		if vs.SectionName != bssSection {
			return v, fmt.Errorf("datapath globals: %s is in %s, want %s (the section shared with user space)", vs.Name, vs.SectionName, bssSection)
		}
	}
	line := uint32(unsafe.Sizeof(flowCpuInflight{}))
	if size := inflight.Size(); size == 0 || size%line != 0 || inflight.Offset%line != 0 {
		return v, fmt.Errorf("datapath .bss: inflight is %d bytes at %d, want whole %d-byte lines", size, inflight.Offset, line)
	}
	if want := uint32(unsafe.Sizeof(flowPrefixState{})); prefixes.Size() != want {
		return v, fmt.Errorf("datapath .bss: local_prefixes is %d bytes, want %d", prefixes.Size(), want)
	}
	v.inflight, v.maxCPUs = inflight.Offset, int(inflight.Size()/line)
	v.prefixes = prefixes.Offset
	logLine := uint32(unsafe.Sizeof(flowLogLine{}))
	if logs.Size() != uint32(v.maxCPUs)*logLine || logs.Offset%logLine != 0 {
		return v, fmt.Errorf("datapath .bss: logs is %d bytes at %d, want %d aligned %d-byte lines", logs.Size(), logs.Offset, v.maxCPUs, logLine)
	}
	v.logs = logs.Offset
	return v, nil
}

// mapShared maps the flow table and the flow log (read only), and the
// table's tags and the program's .bss (read-write: user space clears an
// idle generation's tags, switches each CPU's generation and writes the
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
	d.logs = unsafe.Slice((*flowLogLine)(unsafe.Pointer(&bss[vars.logs])), d.nCPU)
	log, err := mapArray(d.objs.FlowLog, unix.PROT_READ)
	if err != nil {
		return fmt.Errorf("mapping the flow log: %w", err)
	}
	d.mems = append(d.mems, log)
	d.log = unsafe.Slice((*flowLogRec)(unsafe.Pointer(&log[0])), d.objs.FlowLog.MaxEntries())
	tags, err := mapArray(d.objs.FlowTags, unix.PROT_READ|unix.PROT_WRITE)
	if err != nil {
		return fmt.Errorf("mapping the flow table's tags: %w", err)
	}
	d.mems = append(d.mems, tags)
	d.tags = tags[:len(d.table)]
	// The table's geometry, before any program runs (see flow_table).
	for cpu := range d.inflight {
		l := &d.inflight[cpu]
		for g := range l.Base {
			l.Base[g] = uint32(d.regionStart(g, cpu))
		}
	}
	for g := range d.slots {
		d.setSlots(g, d.sizer.start())
	}
	return nil
}

// setSlots sets the slots in use in every CPU's region of generation g, a
// power of two no larger than the region, gives g room for half as many
// flows (see log_line in flow.c), and clears g's tags (see flow_tags in
// flow.c) and its IPv6 prefix (see table_slot in flow.c) for the next
// flows to set. Only while no program
// instance writes to g (see account() in flow.c): at load, or in a drain
// before it makes g active. The atomic stores come before publish's store
// of the `active` that names g. (An instance on a CPU a drain gave up
// waiting for, see Drained.Stuck, may still write to g with the geometry
// it read: within the region, whatever the size, and under an epoch g no
// longer uses, so those counts are lost as Stuck says, and nothing else.
// It may also set g's prefix, which is then that of the turn: the next
// instance on that CPU runs after it and reads it; and a tag, whose slot
// then reads as another flow's, or, when the tag is a flow's fingerprint,
// as free by its epoch.)
func (d *Datapath) setSlots(g, slots int) {
	d.slots[g] = slots
	shift := uint32(64 - bits.TrailingZeros(uint(slots)))
	for cpu := range d.inflight {
		l := &d.inflight[cpu]
		// Both generations' 16-bit shifts are one word, which only this
		// process writes: the other half is stored as it was.
		shifts := (*uint32)(unsafe.Pointer(&l.Shift))
		other := atomic.LoadUint32(shifts) &^ (0xffff << (16 * g))
		atomic.StoreUint32(shifts, other|shift<<(16*g))
		atomic.StoreUint32(&l.Mask[g], uint32(slots-1))
		atomic.StoreUint32(&d.logs[cpu].Room[g], uint32(slots/2))
		start := d.regionStart(g, cpu)
		clear(d.tags[start : start+d.regionSlots])
		for i := range l.Orig6[g] {
			atomic.StoreUint32(&l.Orig6[g][i], 0)
		}
	}
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
