//go:build linux

package bpf

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// The benchmark variants of the datapath, loaded through load: test-only
// ways in, kept out of the package's API (Config, Load).

// loadBenchNewFlows loads the datapath with its benchmark switch on
// (bench_new_flows, a load-time constant that is 0, and its code removed by
// the verifier, in the program the agent loads): every run counts a new
// flow.
func loadBenchNewFlows(cfg Config) (*Datapath, error) {
	return loadSwitchOn(cfg, func(vs *flowVariableSpecs) *ebpf.VariableSpec { return vs.BenchNewFlows })
}

// loadNoConntrack loads the datapath with its conntrack read switched off
// (bench_no_conntrack, a load-time constant that is 0 in the program the
// agent loads): no flow gets an original destination.
func loadNoConntrack(cfg Config) (*Datapath, error) {
	return loadSwitchOn(cfg, func(vs *flowVariableSpecs) *ebpf.VariableSpec { return vs.BenchNoConntrack })
}

// loadSwitchOn loads the datapath with the benchmark switch that pick
// returns set to 1.
func loadSwitchOn(cfg Config, pick func(*flowVariableSpecs) *ebpf.VariableSpec) (*Datapath, error) {
	return load(cfg, func() (*ebpf.CollectionSpec, error) {
		spec, err := loadFlow()
		if err != nil {
			return nil, err
		}
		var specs flowVariableSpecs
		if err := spec.Assign(&specs); err != nil {
			return nil, err
		}
		v := pick(&specs)
		if err := v.Set(uint32(1)); err != nil {
			return nil, fmt.Errorf("setting %s: %w", v.Name, err)
		}
		return spec, nil
	})
}

// loadObjectFile loads the programs from the bpf2go object at path instead
// of the embedded one (BenchmarkNetfilterObjects compares builds in one
// process). The object must have the same maps and globals.
func loadObjectFile(cfg Config, path string) (*Datapath, error) {
	return load(cfg, func() (*ebpf.CollectionSpec, error) { return ebpf.LoadCollectionSpec(path) })
}
