// Package deploy holds what it takes to run kubezonnet on a cluster: the
// kustomize bases and overlays (base/, overlays/), the Prometheus rules
// (rules/, with a PrometheusRule rendering in prometheus-operator/) and the
// Grafana dashboard (dashboards/). The files are the product; the Go code
// exists so that tests render, decode and check them, and so that the
// end-to-end environment (testenv) can apply exactly what users apply.
//
// All files are embedded, so callers need neither the source tree nor a
// working directory inside it. Rendering uses kubectl's built-in kustomize
// (`kubectl kustomize`), the same code path as `kubectl apply -k`.
package deploy

import (
	"bytes"
	"context"
	"embed"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Files are the deploy/ files users apply, embedded so that Render works
// from any working directory and from a built test binary.
//
//go:embed base overlays prometheus-operator rules dashboards
var Files embed.FS

// Kustomizations lists every directory a user can pass to `kubectl apply -k`,
// relative to deploy/. Tests render each of them; a new overlay must be
// added here (TestKustomizationsListed fails otherwise).
var Kustomizations = []string{
	"base",
	"overlays/cgroup",
	"overlays/mimir",
	"overlays/per-zone",
	"overlays/persistent-state",
	"overlays/prometheus-operator",
	"overlays/thanos",
	"overlays/victoriametrics",
	"prometheus-operator",
	"dashboards",
}

// Kubectl is the kubectl binary Render runs; KUBECTL in the environment
// overrides it. kubectl embeds kustomize, so no separate tool is needed.
func Kubectl() string {
	if k := os.Getenv("KUBECTL"); k != "" {
		return k
	}
	return "kubectl"
}

// Render returns the multi-document YAML that `kubectl apply -k
// deploy/<dir>` would apply, where dir is one of Kustomizations. It copies
// the embedded files to a temporary directory (kustomize reads a real file
// tree and follows ../ references between directories) and runs
// `kubectl kustomize` there; no cluster is contacted.
func Render(ctx context.Context, dir string) ([]byte, error) {
	tmp, err := os.MkdirTemp("", "kubezonnet-deploy-")
	if err != nil {
		return nil, fmt.Errorf("rendering %s: %w", dir, err)
	}
	defer os.RemoveAll(tmp)
	if err := copyFS(tmp, Files); err != nil {
		return nil, fmt.Errorf("rendering %s: %w", dir, err)
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, Kubectl(), "kustomize", filepath.Join(tmp, filepath.FromSlash(dir)))
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("rendering %s: kubectl kustomize: %w: %s", dir, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// RenderAll renders every entry of Kustomizations, keyed by directory.
func RenderAll(ctx context.Context) (map[string][]byte, error) {
	out := make(map[string][]byte, len(Kustomizations))
	for _, dir := range Kustomizations {
		b, err := Render(ctx, dir)
		if err != nil {
			return nil, err
		}
		out[dir] = b
	}
	return out, nil
}

// copyFS writes every file of fsys under dir. (os.CopyFS would do, but it
// refuses to overwrite and keeps embed's read-only modes, which makes the
// temporary tree awkward to remove.)
func copyFS(dir string, fsys fs.FS) error {
	return fs.WalkDir(fsys, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		target := filepath.Join(dir, filepath.FromSlash(path))
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		b, err := fs.ReadFile(fsys, path)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o644)
	})
}
