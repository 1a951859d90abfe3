//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// TestCheckFeaturesWrapsCause plays kernels that lack a feature or refuse
// the probe, and checks that the error wraps both our sentinel and the
// probe's own error, so callers can test either with errors.Is.
func TestCheckFeaturesWrapsCause(t *testing.T) {
	noProg := func(pt ebpf.ProgramType) error { return fmt.Errorf("%s: %w", pt, ebpf.ErrNotSupported) }
	noMap := func(mt ebpf.MapType) error { return fmt.Errorf("%s: %w", mt, ebpf.ErrNotSupported) }
	denied := func(ebpf.ProgramType) error { return fmt.Errorf("probe: %w", unix.EPERM) }
	okProg := func(ebpf.ProgramType) error { return nil }
	okMap := func(ebpf.MapType) error { return nil }

	for _, tc := range []struct {
		name     string
		err      error
		sentinel error
		cause    error
	}{
		{"program type missing", checkFeatures(noProg, okMap), ErrNotSupported, ebpf.ErrNotSupported},
		{"map type missing", checkFeatures(okProg, noMap), ErrNotSupported, ebpf.ErrNotSupported},
		{"not permitted", checkFeatures(denied, okMap), ErrPermission, unix.EPERM},
	} {
		if !errors.Is(tc.err, tc.sentinel) || !errors.Is(tc.err, tc.cause) {
			t.Errorf("%s: %q does not wrap both %q and %q", tc.name, tc.err, tc.sentinel, tc.cause)
		}
	}
	if err := checkFeatures(okProg, okMap); err != nil {
		t.Errorf("every feature present: %v", err)
	}
}

// TestBSSLayout checks that the shared globals are found in the object, and
// that a .bss that does not match the generated Go types is refused at load
// rather than read at the wrong offsets.
func TestBSSLayout(t *testing.T) {
	spec, err := loadFlow()
	if err != nil {
		t.Fatal(err)
	}
	// layout assigns a copy of spec to the generated specs, lets edit
	// change it, and reads the layout from the result.
	layout := func(edit func(*flowVariableSpecs)) (bssVars, error) {
		var vs flowVariableSpecs
		if err := spec.Copy().Assign(&vs); err != nil {
			return bssVars{}, err
		}
		edit(&vs)
		return bssLayout(vs.Inflight, vs.LocalPrefixes, vs.Logs)
	}
	v, err := layout(func(*flowVariableSpecs) {})
	if err != nil {
		t.Fatalf("committed object: %v", err)
	}
	if line := int(unsafe.Sizeof(flowCpuInflight{})); v.maxCPUs < 1024 || v.inflight%uint32(line) != 0 {
		t.Errorf("inflight: %d lines at offset %d, want at least 1024 lines, %d-byte aligned", v.maxCPUs, v.inflight, line)
	}
	if v.prefixes == v.inflight || v.logs == v.inflight || v.logs == v.prefixes {
		t.Errorf("local_prefixes, inflight and logs at offsets %d, %d and %d", v.prefixes, v.inflight, v.logs)
	}

	resize := func(vs *ebpf.VariableSpec, by int) { vs.Value = make([]byte, int(vs.Size())+by) }
	tests := []struct {
		name string
		edit func(*flowVariableSpecs)
		want string
	}{
		{"inflight not in .bss", func(vs *flowVariableSpecs) { vs.Inflight.SectionName = ".data" }, "inflight is in .data"},
		{"inflight not whole lines", func(vs *flowVariableSpecs) { resize(vs.Inflight, -8) }, "whole 64-byte lines"},
		{"inflight misaligned", func(vs *flowVariableSpecs) { vs.Inflight.Offset += 8 }, "whole 64-byte lines"},
		{"local_prefixes size", func(vs *flowVariableSpecs) { resize(vs.LocalPrefixes, 8) }, "local_prefixes is"},
		{"logs not in .bss", func(vs *flowVariableSpecs) { vs.Logs.SectionName = ".data" }, "logs is in .data"},
		{"logs not one line per CPU", func(vs *flowVariableSpecs) { resize(vs.Logs, -64) }, "logs is"},
		{"logs misaligned", func(vs *flowVariableSpecs) { vs.Logs.Offset += 8 }, "logs is"},
	}
	for _, tt := range tests {
		_, err := layout(tt.edit)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: error %v, want one containing %q", tt.name, err, tt.want)
		}
	}
	// A global missing from the object is refused by the generated specs.
	noPrefixes := spec.Copy()
	delete(noPrefixes.Variables, flowVarLocalPrefixes)
	var vs flowVariableSpecs
	if err := noPrefixes.Assign(&vs); err == nil || !strings.Contains(err.Error(), "local_prefixes") {
		t.Errorf("local_prefixes missing: error %v, want one naming it", err)
	}
	if _, err := layout(func(*flowVariableSpecs) {}); err != nil {
		t.Errorf("the edits changed the original spec: %v", err)
	}
}
