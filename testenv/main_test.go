package testenv

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
)

// The tests share one environment (a control plane with the default
// cluster and deploy/'s RBAC, no network namespaces) to keep the package
// fast; tests that stop or reshape a control plane start their own.
var shared struct {
	once sync.Once
	env  *Env
	err  error
}

// sharedEnv returns the shared environment, starting it on first use. If
// the API server binaries are not built yet, this is where the (slow,
// first-time only) build happens; its progress goes to stderr.
func sharedEnv(t *testing.T) *Env {
	t.Helper()
	shared.once.Do(func() {
		shared.env, shared.err = StartEnv(context.Background(), EnvOptions{
			ControlPlane: Options{Binaries: testBinaries(t)},
		})
	})
	if shared.err != nil {
		t.Fatalf("starting the shared environment: %v", shared.err)
	}
	return shared.env
}

var bins struct {
	once sync.Once
	b    Binaries
	err  error
}

// testBinaries finds the binaries once, building them when missing, and
// says so: a first `go test` on a fresh machine spends minutes here.
func testBinaries(t *testing.T) Binaries {
	t.Helper()
	bins.once.Do(func() {
		bins.b, bins.err = FindBinaries(context.Background(), os.Stderr)
	})
	if bins.err != nil {
		t.Fatalf("kube-apiserver and etcd are needed for these tests: %v", bins.err)
	}
	return bins.b
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.env != nil {
		if err := shared.env.Close(); err != nil {
			fmt.Fprintf(os.Stderr, "closing the shared environment: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}
