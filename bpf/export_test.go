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
	return load(cfg, func() (*ebpf.CollectionSpec, error) {
		spec, err := loadFlow()
		if err != nil {
			return nil, err
		}
		var specs flowVariableSpecs
		if err := spec.Assign(&specs); err != nil {
			return nil, err
		}
		if err := specs.BenchNewFlows.Set(uint32(1)); err != nil {
			return nil, fmt.Errorf("setting bench_new_flows: %w", err)
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
