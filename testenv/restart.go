package testenv

import (
	"bufio"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Restart describes one RestartServer: how the old server ended and how
// long the new one took to become ready.
type Restart struct {
	// Signal the old server was stopped with.
	Signal syscall.Signal
	// Exit is how the old server ended: nil for exit status 0, "signal:
	// killed" after SIGKILL (or after a graceful stop that overran its
	// grace period).
	Exit error
	// Stopping is how long the old server took to exit after the signal.
	Stopping time.Duration
	// Ready is how long the new server took from its start to the first
	// 200 of /readyz (to within the 100ms the poll sleeps): loading its
	// state, syncing its informers.
	Ready time.Duration
}

// StopServer stops the server with sig. SIGKILL kills its process group at
// once, a crash; any other signal asks it to stop and waits up to grace for
// it to exit before killing it. It returns how the server ended (nil: exit
// status 0). Stopping a server that has already exited only reports how it
// ended.
func (s *Stack) StopServer(sig syscall.Signal, grace time.Duration) error {
	p := s.Server.p
	if sig == syscall.SIGKILL {
		p.kill()
		return p.err
	}
	if !p.exited() {
		_ = p.cmd.Process.Signal(sig)
		select {
		case <-p.done:
		case <-time.After(grace):
		}
	}
	// Either way nothing of the group may outlive it.
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
	return p.err
}

// RestartServer stops the server with sig (see StopServer) and starts it
// again on the same address with the same arguments (see SetServerArgs),
// returning once the new one is ready. The agents keep running: they hold
// and resend what the server did not acknowledge.
func (s *Stack) RestartServer(ctx context.Context, sig syscall.Signal, grace time.Duration) (Restart, error) {
	r := Restart{Signal: sig}
	begin := time.Now()
	r.Exit = s.StopServer(sig, grace)
	r.Stopping = time.Since(begin)
	start := time.Now()
	if err := s.StartServer(ctx); err != nil {
		return r, err
	}
	r.Ready = time.Since(start)
	return r, nil
}

// SetServerArgs replaces StackOptions.ServerArgs (what is added to the
// stack's own server arguments) for the next StartServer or RestartServer.
func (s *Stack) SetServerArgs(args []string) {
	base := s.serverArgs[:len(s.serverArgs)-len(s.opts.ServerArgs)]
	s.opts.ServerArgs = slices.Clone(args)
	s.serverArgs = append(slices.Clone(base), args...)
}

// AgentURL returns the base URL of the agent on node (its /metrics,
// /healthz and /readyz), empty for an unknown node.
func (s *Stack) AgentURL(node string) string { return s.agentURLs[node] }

// ScrapeMetrics reads a Prometheus text page (a /metrics of the server or
// an agent) and returns the sum of every metric's samples by metric name,
// whatever their labels, and each labelled series' value under the series
// as exposed (name{labels}).
func ScrapeMetrics(ctx context.Context, url string) (map[string]float64, error) {
	body, err := HTTPGet(ctx, url)
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, i := line, strings.IndexAny(line, "{ ")
		if i >= 0 {
			name = line[:i]
		}
		j := strings.LastIndexByte(line, ' ')
		if j < 0 {
			return nil, fmt.Errorf("%s: malformed line %q", url, line)
		}
		v, err := strconv.ParseFloat(line[j+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("%s: line %q: %w", url, line, err)
		}
		out[name] += v
		if j > 0 && line[j-1] == '}' {
			out[line[:j]] = v
		}
	}
	return out, sc.Err()
}
