// Package testutil holds helpers shared by tests across packages.
package testutil

import (
	"os"
	"testing"
)

// RequireRoot skips a test that needs root (CAP_BPF, CAP_NET_ADMIN, network
// namespaces). CI runs as root and fails the run when any test printed this
// skip message, so the skip only ever happens on a developer's laptop.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIP-PRIVILEGED: needs root (CAP_BPF, CAP_NET_ADMIN); CI runs as root and fails on this skip")
	}
}
