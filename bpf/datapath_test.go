//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"testing"

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
