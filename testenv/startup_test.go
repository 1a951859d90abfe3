package testenv

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/yaml"

	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// The server's start and stop as an operator sees them: its exit status,
// its log on stderr (JSON lines only, client-go's included) and how long
// SIGTERM takes. These tests run the real binary; none needs root.

// serverProc is a `kubezonnet server` whose stderr is kept apart from its
// stdout (where the flow log goes), so that the log can be checked line by
// line.
type serverProc struct {
	cmd     *exec.Cmd
	started time.Time
	stderr  testutil.SyncBuffer
	done    chan struct{}
	err     error // of Wait, valid once done is closed
}

// startServer runs bin with args in its own process group; the group is
// killed when the test ends (and by the kernel if the test binary dies).
func startServer(t *testing.T, bin string, args ...string) *serverProc {
	t.Helper()
	p := &serverProc{done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout = io.Discard
	p.cmd.Stderr = &p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", bin, err)
	}
	p.started = time.Now()
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	})
	return p
}

// logLines parses every stderr line as a JSON object; a line that is not
// one is returned as an error.
func (p *serverProc) logLines() ([]map[string]any, error) {
	var lines []map[string]any
	sc := bufio.NewScanner(strings.NewReader(p.stderr.String()))
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			return lines, fmt.Errorf("stderr line %d is not JSON (%v): %s", n, err, sc.Text())
		}
		lines = append(lines, m)
	}
	return lines, sc.Err()
}

// waitLine polls stderr until a line satisfies match, the server exits or
// the deadline passes.
func (p *serverProc) waitLine(t *testing.T, what string, deadline time.Time, match func(map[string]any) bool) map[string]any {
	t.Helper()
	for {
		lines, err := p.logLines()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range lines {
			if match(l) {
				return l
			}
		}
		select {
		case <-p.done:
			t.Fatalf("server exited (%v) before %s; stderr:\n%s", p.err, what, p.stderr.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %s of the start; stderr:\n%s", what, time.Until(deadline)+time.Since(p.started), p.stderr.String())
		}
	}
}

// stop sends SIGTERM and waits up to limit for the exit; it returns how
// long the exit took and how the server ended.
func (p *serverProc) stop(t *testing.T, limit time.Duration) (time.Duration, error) {
	t.Helper()
	begin := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	select {
	case <-p.done:
		return time.Since(begin), p.err
	case <-time.After(limit):
		t.Fatalf("server still running %s after SIGTERM; stderr:\n%s", limit, p.stderr.String())
		return 0, nil
	}
}

// closedPort returns a port of 127.0.0.1 that nothing listens on (one
// freePorts found and let go): a connection to it is refused at once.
func closedPort(t *testing.T) int {
	t.Helper()
	ports, err := freePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	return ports[0]
}

// A server without a remote-write endpoint would never be ready: without
// --keep-only it refuses to start, naming the flags.
func TestServerRefusesToStartWithoutEndpoint(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	bin, err := testutil.BuildKubezonnet(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, bin, "server", "--auth-mode", "none", "--listen-address", "127.0.0.1:0")
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = io.Discard, &stderr
	err = cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() == 0 {
		t.Fatalf("server without an endpoint: %v, want a non-zero exit; stderr:\n%s", err, stderr.String())
	}
	for _, want := range []string{"--remote-write-url", "--remote-write-config", "--keep-only"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr does not name %s:\n%s", want, stderr.String())
		}
	}
}

// forbidding returns the URL of an API server that answers every request
// with 403 Forbidden, as one does to a client whose RBAC is missing:
// client-go gives up on each list at once and logs about it (unlike a
// refused connection, which it retries quietly at the default verbosity).
func forbidding(t *testing.T) string {
	t.Helper()
	api := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusForbidden)
		fmt.Fprintf(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403,`+
			`"message":"forbidden: user test cannot %s %s"}`, r.Method, r.URL.Path)
	}))
	t.Cleanup(api.Close)
	return api.URL
}

// With an API server that cannot be reached, the server says within 10 s,
// on stderr, which API server it waits for and what it answered, and
// /readyz gives the same reason; every stderr line, client-go's included
// (routed through the server's logger), is JSON; SIGTERM ends it with 0
// within --shutdown-grace-period, informers still retrying or not.
func TestServerLogsWhyNotSynced(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	bin, err := testutil.BuildKubezonnet(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		apiServer func(t *testing.T) string
		wantErr   string
		// clientGo: client-go itself logs the failure too.
		clientGo bool
	}{
		{"refused", func(t *testing.T) string { return "https://127.0.0.1:" + strconv.Itoa(closedPort(t)) }, "connection refused", false},
		{"forbidden", forbidding, "forbidden", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			apiServer := tc.apiServer(t)
			kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
			kc := clientcmdapi.NewConfig()
			kc.Clusters["gone"] = &clientcmdapi.Cluster{Server: apiServer, InsecureSkipTLSVerify: true}
			kc.AuthInfos["gone"] = &clientcmdapi.AuthInfo{Token: "unused"}
			kc.Contexts["gone"] = &clientcmdapi.Context{Cluster: "gone", AuthInfo: "gone"}
			kc.CurrentContext = "gone"
			if err := clientcmd.WriteToFile(*kc, kubeconfig); err != nil {
				t.Fatal(err)
			}

			const grace = 2 * time.Second // the least --shutdown-grace-period
			srv := startServer(t, bin, "server", "--kubeconfig", kubeconfig, "--keep-only", "--auth-mode", "none",
				"--listen-address", "127.0.0.1:0", "--log-format", "json", "--shutdown-grace-period", grace.String())
			deadline := srv.started.Add(10 * time.Second)
			why := srv.waitLine(t, "warning that the informers have not synced", deadline, func(l map[string]any) bool {
				return l["msg"] == "waiting for the Kubernetes API: informers not synced"
			})
			t.Logf("reason logged %s after the start: %v", time.Since(srv.started).Round(time.Millisecond), why)
			if why["level"] != "WARN" || why["api_server"] != apiServer {
				t.Errorf("warning %v: want level WARN and api_server %s", why, apiServer)
			}
			if e, _ := why["err"].(string); !strings.Contains(e, tc.wantErr) {
				t.Errorf("warning %v: want the error (%s) in err", why, tc.wantErr)
			}
			if tc.clientGo {
				srv.waitLine(t, "a client-go line", deadline, func(l map[string]any) bool { return l["component"] == "client-go" })
			}

			start := srv.waitLine(t, "the start line", deadline, func(l map[string]any) bool { return l["msg"] == "server starting" })
			resp, err := http.Get("http://" + start["listen"].(string) + "/readyz")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "not synced") ||
				!strings.Contains(string(body), tc.wantErr) {
				t.Errorf("/readyz: %s %q, want 503 with the reason (%s)", resp.Status, body, tc.wantErr)
			}

			took, err := srv.stop(t, 30*time.Second)
			t.Logf("exited %s after SIGTERM", took.Round(time.Millisecond))
			if err != nil {
				t.Errorf("exit after SIGTERM: %v, want status 0; stderr:\n%s", err, srv.stderr.String())
			}
			// The grace period is the time from SIGTERM to exit; a second
			// more is for the process' own exit after the last step.
			if took > grace+time.Second {
				t.Errorf("exit took %s after SIGTERM, want at most --shutdown-grace-period %s (+1s); stderr:\n%s", took, grace, srv.stderr.String())
			}
			// Every line, to the last one written on the way out.
			if lines, err := srv.logLines(); err != nil {
				t.Error(err)
			} else if len(lines) == 0 {
				t.Error("nothing on stderr")
			}
		})
	}
}

// serverManifest returns what deploy/'s server Deployment gives the
// server to stop in: the pod's terminationGracePeriodSeconds and the
// container's --shutdown-grace-period.
func serverManifest(t *testing.T) (termination, shutdown time.Duration) {
	t.Helper()
	root, err := testutil.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "deploy", "base", "server", "deployment.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var d appsv1.Deployment
	if err := yaml.UnmarshalStrict(b, &d); err != nil {
		t.Fatalf("deploy/base/server/deployment.yaml: %v", err)
	}
	if d.Spec.Template.Spec.TerminationGracePeriodSeconds == nil {
		t.Fatal("deploy/base/server/deployment.yaml sets no terminationGracePeriodSeconds")
	}
	termination = time.Duration(*d.Spec.Template.Spec.TerminationGracePeriodSeconds) * time.Second
	for _, c := range d.Spec.Template.Spec.Containers {
		if c.Name != "server" {
			continue
		}
		for i, a := range c.Args {
			v, ok := strings.CutPrefix(a, "--shutdown-grace-period=")
			if !ok && a == "--shutdown-grace-period" && i+1 < len(c.Args) {
				v, ok = c.Args[i+1], true
			}
			if ok {
				if shutdown, err = time.ParseDuration(v); err != nil {
					t.Fatalf("--shutdown-grace-period %q: %v", v, err)
				}
				return termination, shutdown
			}
		}
	}
	t.Fatal("deploy/base/server/deployment.yaml: the server container has no --shutdown-grace-period")
	return 0, 0
}

// deadEndpoint is a remote-write endpoint that accepts connections and
// never answers, as a hung receiver does: every push waits for its
// timeout.
type deadEndpoint struct {
	l        net.Listener
	mu       sync.Mutex
	conns    []net.Conn
	accepted int
}

func newDeadEndpoint(t *testing.T) *deadEndpoint {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &deadEndpoint{l: l}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			d.mu.Lock()
			d.conns = append(d.conns, c)
			d.accepted++
			d.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, c := range d.conns {
			c.Close()
		}
	})
	return d
}

func (d *deadEndpoint) url() string { return "http://" + d.l.Addr().String() + "/api/v1/write" }

func (d *deadEndpoint) connections() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.accepted
}

// With its remote-write endpoint hung mid-push, the server stopped by
// SIGTERM exits with 0 within the pod's terminationGracePeriodSeconds, run
// as deploy/ runs it (--shutdown-grace-period, a state directory): the
// kubelet never has to SIGKILL it.
func TestServerSIGTERMWithDeadEndpoint(t *testing.T) {
	termination, shutdownGrace := serverManifest(t)
	env := sharedEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bin, err := testutil.BuildKubezonnet(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	ports, err := freePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	dead := newDeadEndpoint(t)
	addr := "127.0.0.1:" + strconv.Itoa(ports[0])
	srv := startServer(t, bin, "server", "--kubeconfig", env.ServerKubeconfig, "--auth-mode", "none",
		"--listen-address", addr, "--log-format", "json", "--flow-log-classes", "none",
		"--remote-write-url", dead.url(), "--push-interval", "1s",
		"--state-dir", filepath.Join(dir, "state"),
		"--shutdown-grace-period", shutdownGrace.String())
	// Waiting for readiness, not timing it: the deadline is a hang guard.
	srv.waitLine(t, "informers synced", time.Now().Add(time.Minute), func(l map[string]any) bool {
		return l["msg"] == "informers synced"
	})

	// A few batches, so that there is something to push and checkpoint.
	var enc wire.Encoder
	for seq := uint64(1); seq <= 3; seq++ {
		body := enc.Encode(&wire.Batch{Node: "node-a1", Incarnation: "startup-test", Seq: seq,
			Time: time.Now(), Flows: testutil.ClusterFlows(100)})
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+"/api/v1/write", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", remotewrite.ContentType)
		req.Header.Set("Content-Encoding", remotewrite.ContentEncoding)
		req.Header.Set(remotewrite.HeaderVersion, remotewrite.ProtocolVersion)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		msg, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode >= 300 {
			t.Fatalf("batch %d: %s %s", seq, resp.Status, bytes.TrimSpace(msg))
		}
	}
	// A push hangs on the endpoint when SIGTERM comes.
	for hang := time.Now().Add(time.Minute); dead.connections() == 0; {
		if time.Now().After(hang) {
			t.Fatalf("the server never connected to the remote-write endpoint; stderr:\n%s", srv.stderr.String())
		}
		time.Sleep(20 * time.Millisecond) // the poll interval
	}

	// Past terminationGracePeriodSeconds the kubelet would SIGKILL it;
	// waiting a little longer only tells by how much it overran.
	took, err := srv.stop(t, termination+10*time.Second)
	t.Logf("exited %s after SIGTERM (--shutdown-grace-period %s, terminationGracePeriodSeconds %s)",
		took.Round(time.Millisecond), shutdownGrace, termination)
	if err != nil {
		t.Errorf("exit after SIGTERM: %v, want status 0; stderr:\n%s", err, srv.stderr.String())
	}
	if took >= termination {
		t.Errorf("exit took %s after SIGTERM, want less than terminationGracePeriodSeconds (%s); stderr:\n%s",
			took, termination, srv.stderr.String())
	}
	if lines, err := srv.logLines(); err != nil {
		t.Error(err)
	} else {
		for _, l := range lines {
			if strings.HasPrefix(fmt.Sprint(l["msg"]), "shutdown") {
				t.Logf("%v", l)
			}
		}
	}
}
