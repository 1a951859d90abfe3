package testutil

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
)

// modulePath identifies the repository root by its go.mod.
const modulePath = "github.com/kubezonnet/kubezonnet"

// RepoRoot returns the root of the kubezonnet repository: the nearest
// ancestor of the working directory whose go.mod declares the module, or
// failing that the checkout this file was compiled from. The demo and the
// tests find deploy/ and testenv/ through it wherever they were started.
func RepoRoot() (string, error) {
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		starts = append(starts, filepath.Dir(file))
	}
	for _, dir := range starts {
		for d := dir; ; d = filepath.Dir(d) {
			if isRepoRoot(d) {
				return d, nil
			}
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	return "", fmt.Errorf("finding the repository root: no go.mod of %s above %s", modulePath, strings.Join(starts, " or "))
}

func isRepoRoot(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		return false
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	return strings.TrimSpace(string(line)) == "module "+modulePath
}

// BuildKubezonnet builds the kubezonnet binary of this checkout into dir
// and returns its path, for tests and the demo that run the real binary.
func BuildKubezonnet(ctx context.Context, dir string) (string, error) {
	return BuildCommand(ctx, dir, "kubezonnet", ".")
}

// BuildCommand builds the main package pkg of this checkout (a path
// relative to the repository root, such as ./testenv/traffic/cmd/udpgen)
// into dir under name and returns its path: for benchmarks whose helpers
// must run as processes of their own.
func BuildCommand(ctx context.Context, dir, name, pkg string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, name)
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building %s: %w: %s", name, err, bytes.TrimSpace(out))
	}
	return bin, nil
}
