package testenv

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// binEnv names the environment variable that points at a folder holding
// prebuilt kube-apiserver and etcd binaries (it is also read by
// build-k8s.sh), for machines that keep them outside the repository.
const binEnv = "KUBEZONNET_TESTENV_BIN"

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
	root, err := testutil.RepoRoot()
	if err != nil {
		return Binaries{}, err
	}
	dir := os.Getenv(binEnv)
	if dir == "" {
		dir = filepath.Join(root, "testenv", ".cache", "bin")
	}
	b := Binaries{KubeAPIServer: filepath.Join(dir, "kube-apiserver"), Etcd: filepath.Join(dir, "etcd")}
	if progress == nil {
		progress = io.Discard
	}
	if fresh(b.KubeAPIServer, root) && fresh(b.Etcd, root) {
		fmt.Fprintf(progress, "testenv: reusing kube-apiserver and etcd built earlier in %s\n", dir)
		return b, nil
	}
	fmt.Fprintf(progress, "testenv: kube-apiserver or etcd missing or stale in %s; building them with testenv/build-k8s.sh (about 10 minutes on 2 cores the first time: etcd 1.5, kube-apiserver 8; cached in testenv/.cache afterwards)\n", dir)
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
