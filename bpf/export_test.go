//go:build linux

package bpf

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// The benchmark variants of the datapath, loaded through load: test-only
// ways in, kept out of the package's API (Config, Load).

// loadBenchNewFlows loads the datapath with its benchmark switch on
// (bench_new_flows, a load-time constant that is 0, and its code removed by
// the verifier, in the program the agent loads): every run counts a new
// flow.
func loadBenchNewFlows(cfg Config) (*Datapath, error) {
	return load(cfg, func() (*ebpf.CollectionSpec, error) { return specWithSwitch("bench_new_flows") })
}

// specWithSwitch is the embedded datapath's spec with the load-time
// constant name (one of the bench_* switches, 0 in the agent) set to 1.
func specWithSwitch(name string) (*ebpf.CollectionSpec, error) {
	spec, err := loadFlow()
	if err != nil {
		return nil, err
	}
	v, ok := spec.Variables[name]
	if !ok {
		return nil, fmt.Errorf("no variable %s in the datapath spec", name)
	}
	if err := v.Set(uint32(1)); err != nil {
		return nil, fmt.Errorf("setting %s: %w", name, err)
	}
	return spec, nil
}

// loadObjectFile loads the programs from the bpf2go object at path instead
// of the embedded one (BenchmarkNetfilterObjects compares builds in one
// process). The object must have the same maps and globals.
func loadObjectFile(cfg Config, path string) (*Datapath, error) {
	return load(cfg, func() (*ebpf.CollectionSpec, error) { return ebpf.LoadCollectionSpec(path) })
}

// origFromPort is the original destination a copy without the read gives
// its flows (loadProgramCopy): the zero value, none.
type origFromPort struct {
	addr      netip.Addr
	portDelta uint16 // the destination port less this is the original one
}

// loadProgramCopy loads another copy of the program name (kzn_netfilter
// or kzn_cgroup_egress) that counts into d's maps: with read false, its
// read of an original destination switched off (bench_no_conntrack, a
// load-time constant that is 0 in the programs the agent loads), so that
// no flow gets an original destination, unless as is set: then every
// netfilter flow with a destination port gets as.addr, its port the
// packet's destination port less as.portDelta (bench_orig), from the
// packet instead of conntrack. With read true, the code the agent loads.
// Copies differ from one another in their code only, not in where their
// flow table, in-flight lines and prefixes lie in memory. On real packets
// two loaded copies of the same code still differ by more than the read
// costs (BenchmarkNetfilterConntrack, BENCHMARKS.md), so the benchmark
// loads fresh copies of both builds, round after round.
func (d *Datapath) loadProgramCopy(name string, read bool, as origFromPort) (*ebpf.Program, error) {
	spec, err := loadFlow()
	if !read {
		spec, err = specWithSwitch("bench_no_conntrack")
	}
	if err != nil {
		return nil, err
	}
	if as.addr.IsValid() {
		if read || as.portDelta == 0 {
			return nil, fmt.Errorf("an original destination from the port needs the read off and a port distance, have read %t and distance %d", read, as.portDelta)
		}
		a := as.addr.As16()
		words := [2]uint64{binary.LittleEndian.Uint64(a[:8]), binary.LittleEndian.Uint64(a[8:])}
		if err := spec.Variables["bench_orig"].Set(words); err != nil {
			return nil, fmt.Errorf("setting bench_orig: %w", err)
		}
		if err := spec.Variables["bench_orig_port_delta"].Set(uint32(as.portDelta)); err != nil {
			return nil, fmt.Errorf("setting bench_orig_port_delta: %w", err)
		}
	}
	shared := map[string]*ebpf.Map{
		"counters": d.objs.Counters, "flow_maps": d.objs.FlowMaps,
		"flow_table": d.objs.FlowTable, "flow_tags": d.objs.FlowTags, "flow_log": d.objs.FlowLog,
		"flows_0": d.objs.Flows0, "flows_1": d.objs.Flows1,
		"sock_dsts": d.objs.SockDsts, bssSection: d.objs.Bss,
	}
	for name, m := range shared {
		ms, ok := spec.Maps[name]
		if !ok {
			return nil, fmt.Errorf("no map %s in the datapath spec", name)
		}
		ms.MaxEntries = m.MaxEntries()
	}
	// Every map but the constants is d's: a map of its own would be one
	// the copy counts into and the drain never reads.
	for name := range spec.Maps {
		if _, ok := shared[name]; !ok && name != ".rodata" {
			return nil, fmt.Errorf("map %s of the datapath spec is not shared with the copy", name)
		}
	}
	if err := spec.Variables["log_shift"].Set(uint32(d.logShift)); err != nil {
		return nil, fmt.Errorf("setting the copy's log_shift: %w", err)
	}
	ps, ok := spec.Programs[name]
	if !ok {
		return nil, fmt.Errorf("no program %s in the datapath spec", name)
	}
	spec.Programs = map[string]*ebpf.ProgramSpec{name: ps}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: shared})
	if err != nil {
		return nil, fmt.Errorf("loading a copy of %s (original destination read %t): %w", name, read, err)
	}
	defer coll.Close()
	return coll.DetachProgram(name), nil
}
