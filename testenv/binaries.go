package testenv

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// binEnv names the environment variable that points at a folder holding
// prebuilt kube-apiserver and etcd binaries (it is also read by
// build-k8s.sh), for machines that keep them outside the repository.
const binEnv = "KUBEZONNET_TESTENV_BIN"

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

// Binaries are the paths of the programs a ControlPlane runs.
type Binaries struct {
	KubeAPIServer string
	Etcd          string
}

// FindBinaries returns the binaries in $KUBEZONNET_TESTENV_BIN or
// testenv/.cache/bin, building them first with testenv/build-k8s.sh when
// they are missing or older than testenv/tools/go.mod (the script decides).
// The script's progress goes to progress (nil discards it): the first build
// takes minutes and the caller should say why it is waiting.
func FindBinaries(ctx context.Context, progress io.Writer) (Binaries, error) {
	root, err := RepoRoot()
	if err != nil {
		return Binaries{}, err
	}
	dir := os.Getenv(binEnv)
	if dir == "" {
		dir = filepath.Join(root, "testenv", ".cache", "bin")
	}
	b := Binaries{KubeAPIServer: filepath.Join(dir, "kube-apiserver"), Etcd: filepath.Join(dir, "etcd")}
	if fresh(b.KubeAPIServer, root) && fresh(b.Etcd, root) {
		return b, nil
	}
	if progress == nil {
		progress = io.Discard
	}
	fmt.Fprintf(progress, "testenv: kube-apiserver or etcd missing or stale in %s; building them with testenv/build-k8s.sh (minutes the first time)\n", dir)
	cmd := exec.CommandContext(ctx, filepath.Join(root, "testenv", "build-k8s.sh"))
	cmd.Env = append(os.Environ(), binEnv+"="+dir)
	// SIGTERM, not SIGKILL, on cancellation and when this process dies:
	// the script then stops the compilers it started.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	done := make(chan struct{})
	go func() {
		// Prefix nothing, but copy line by line so that a test's output
		// (t.Log through a writer) shows progress as it happens.
		defer close(done)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			fmt.Fprintln(progress, sc.Text())
		}
	}()
	err = cmd.Run()
	pw.Close()
	<-done
	if err != nil {
		return Binaries{}, fmt.Errorf("building kube-apiserver and etcd with testenv/build-k8s.sh: %w", err)
	}
	for _, p := range []string{b.KubeAPIServer, b.Etcd} {
		if _, err := os.Stat(p); err != nil {
			return Binaries{}, fmt.Errorf("build-k8s.sh succeeded but %w", err)
		}
	}
	return b, nil
}

// fresh reports whether bin exists and is newer than the tools module's
// go.mod, the rule build-k8s.sh applies too.
func fresh(bin, root string) bool {
	bi, err := os.Stat(bin)
	if err != nil || bi.Mode()&0o111 == 0 {
		return false
	}
	mi, err := os.Stat(filepath.Join(root, "testenv", "tools", "go.mod"))
	if errors.Is(err, os.ErrNotExist) {
		return true
	}
	return err == nil && bi.ModTime().After(mi.ModTime())
}

// BuildKubezonnet builds the kubezonnet binary of this checkout into dir
// and returns its path, for the environment's agents and server.
func BuildKubezonnet(ctx context.Context, dir string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "kubezonnet")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, ".")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building kubezonnet: %w: %s", err, bytes.TrimSpace(out))
	}
	return bin, nil
}
