// Package netns runs code inside another network namespace.
//
// Network namespaces are a per-thread property in Linux, so the calling
// goroutine is locked to its OS thread, the thread is moved into the target
// namespace, the function runs, and the thread is moved back. Sockets and BPF
// netfilter links created inside fn stay bound to the target namespace after
// Do returns, which is how the agent attaches in a node namespace and how
// tests open sockets in pod namespaces.
package netns

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Path returns the bind-mount path of a namespace created by `ip netns add`.
func Path(name string) string { return "/var/run/netns/" + name }

// Do runs fn with the calling thread inside the network namespace at path
// (e.g. /var/run/netns/NAME or /proc/PID/ns/net). An empty path runs fn in
// the current namespace.
func Do(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	target, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", path, err)
	}
	defer target.Close()

	runtime.LockOSThread()
	orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("opening current network namespace: %w", err)
	}
	defer orig.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("entering network namespace %s: %w", path, err)
	}
	fnErr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// The thread is stuck in the wrong namespace: keep it locked so
		// that the runtime destroys it when this goroutine exits.
		if fnErr != nil {
			return fmt.Errorf("returning from network namespace %s: %w (after: %w)", path, err, fnErr)
		}
		return fmt.Errorf("returning from network namespace %s: %w", path, err)
	}
	runtime.UnlockOSThread()
	return fnErr
}
