package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// process is a child program in its own process group. The kernel kills it
// when this process dies (Pdeathsig), so a test binary that panics or is
// killed by `go test -timeout` leaves nothing behind; kill covers the
// ordinary paths.
type process struct {
	name string
	cmd  *exec.Cmd
	out  *tailBuffer
	done chan struct{}
	err  error // of Wait, valid once done is closed
}

// startProcess runs bin with args and env added to the environment,
// sending its output to a tail buffer and to extra (when not nil).
func startProcess(name, bin string, args []string, extra io.Writer, env []string) (*process, error) {
	p := &process{name: name, out: newTailBuffer(64 << 10), done: make(chan struct{})}
	var w io.Writer = p.out
	if extra != nil {
		w = io.MultiWriter(p.out, &prefixWriter{prefix: name + ": ", w: extra})
	}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = w, w
	if len(env) > 0 {
		p.cmd.Env = append(os.Environ(), env...)
	}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s (%s): %w", name, bin, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// exited reports whether the process has ended.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL to the whole process group and waits for the process
// to be reaped. Neither program needs a graceful stop: their data lives in
// a temporary directory that is removed next.
func (p *process) kill() {
	if p == nil {
		return
	}
	if !p.exited() {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	}
	<-p.done
}

// failure describes an unexpected exit with the end of the output.
func (p *process) failure() error {
	return fmt.Errorf("%s exited: %v; last output:\n%s", p.name, p.err, p.out.String())
}

// tailBuffer keeps the last max bytes written to it, to explain a failure.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{max: max} }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if over := len(t.b) - t.max; over > 0 {
		t.b = append(t.b[:0], t.b[over:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.b
	// Show whole lines only, at most 40 of them.
	if i := bytes.IndexByte(b, '\n'); i >= 0 && len(b) == t.max {
		b = b[i+1:]
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// prefixWriter prefixes every line with the program's name.
type prefixWriter struct {
	mu     sync.Mutex
	prefix string
	w      io.Writer
	line   []byte
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(b)
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			p.line = append(p.line, b...)
			break
		}
		p.line = append(p.line, b[:i+1]...)
		if _, err := io.WriteString(p.w, p.prefix+string(p.line)); err != nil {
			return 0, err
		}
		p.line = p.line[:0]
		b = b[i+1:]
	}
	return n, nil
}

// freePorts returns n distinct ports free on 127.0.0.1 right now. Another
// program may take one before the child binds it; startup then fails with
// "address already in use" and StartControlPlane tries again.
func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free port on 127.0.0.1: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// removeAll removes dir, ignoring that it is already gone.
func removeAll(dir string) error {
	if dir == "" {
		return nil
	}
	if err := os.RemoveAll(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing %s: %w", dir, err)
	}
	return nil
}

// ProcessOptions configure StartProcess.
type ProcessOptions struct {
	// Netns runs the program inside this named network namespace (via
	// `ip netns exec`); empty keeps the caller's.
	Netns string
	// Env is added to the inherited environment.
	Env []string
	// Output receives the program's output, lines prefixed with its name;
	// nil keeps only the tail (Process.Output).
	Output io.Writer
}

// Process is a program started for the environment (an agent, the server,
// Prometheus). It runs in its own process group and is killed by the
// kernel if this process dies, so that no test leaves it behind.
type Process struct{ p *process }

// StartProcess starts bin with args.
func StartProcess(name, bin string, args []string, o ProcessOptions) (*Process, error) {
	if o.Netns != "" {
		args = append([]string{"netns", "exec", o.Netns, bin}, args...)
		bin = "ip"
	}
	p, err := startProcess(name, bin, args, o.Output, o.Env)
	if err != nil {
		return nil, err
	}
	return &Process{p: p}, nil
}

// Pid returns the process id.
func (p *Process) Pid() int { return p.p.cmd.Process.Pid }

// Done is closed when the program has exited.
func (p *Process) Done() <-chan struct{} { return p.p.done }

// Err returns how the program exited; valid once Done is closed.
func (p *Process) Err() error { return p.p.err }

// Output returns the last lines the program printed.
func (p *Process) Output() string { return p.p.out.String() }

// Stop sends SIGTERM and waits up to grace for the program to exit (a
// graceful stop is what a restart test exercises), then SIGKILLs its
// process group. It returns the program's exit error, nil for a clean
// exit. Safe to call more than once.
func (p *Process) Stop(grace time.Duration) error {
	if !p.p.exited() {
		_ = p.p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.p.done:
		case <-time.After(grace):
		}
	}
	// Kill the group either way: children must not outlive the program.
	_ = syscall.Kill(-p.p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.p.done
	return p.p.err
}

// Kill SIGKILLs the program's process group and waits for it.
func (p *Process) Kill() { p.p.kill() }
