package deploy

import (
	"os"
	"os/exec"
	"testing"
)

// requireTool returns the path of an external program a test runs
// (kubectl, promtool). CI runs as root with both installed, so there a
// missing tool fails the test; a developer without it gets a skip that says
// what to install.
func requireTool(t *testing.T, name, install string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Geteuid() == 0 {
		t.Fatalf("%s not found (%v); install %s", name, err, install)
	}
	t.Skipf("%s not found (%v); install %s", name, err, install)
	return ""
}
