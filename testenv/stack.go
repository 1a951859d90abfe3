package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// PrometheusBinary is the Debian package's Prometheus, the remote-write
// receiver of the demo and the end-to-end suite.
const PrometheusBinary = "/usr/bin/prometheus"

// PrometheusArgs are the arguments of a Prometheus that receives remote
// writes on addr, with its configuration file and its data directory.
func PrometheusArgs(config, data, addr string) []string {
	return []string{
		"--config.file=" + config, "--storage.tsdb.path=" + data,
		"--web.listen-address=" + addr, "--web.enable-remote-write-receiver",
		// Fresh samples in instant queries right away.
		"--query.lookback-delta=5m",
	}
}

// StackOptions configure StartStack.
type StackOptions struct {
	// Bin is the kubezonnet binary (BuildKubezonnet).
	Bin string
	// FlushInterval of the agents and PushInterval of the server; short
	// values make tests and the demo fast.
	FlushInterval, PushInterval time.Duration
	// ServerArgs are added to the server's command line.
	ServerArgs []string
	// RulesFiles are loaded into Prometheus (e.g. deploy/rules).
	RulesFiles []string
	// StaticEndpoints is the content of the server's static endpoints
	// file; empty means none.
	StaticEndpoints string
	// Output receives every program's output, prefixed with its name.
	Output io.Writer
}

// Stack is kubezonnet running on an Env: one agent per node namespace,
// the server with its own ServiceAccount, and Prometheus as the
// remote-write target.
type Stack struct {
	env        *Env
	opts       StackOptions
	Prometheus *Process
	// PrometheusURL is Prometheus' base URL on 127.0.0.1.
	PrometheusURL string
	Server        *Process
	// ServerURL is the server's base URL on 127.0.0.1.
	ServerURL string
	// Agents by node name.
	Agents map[string]*Process

	promArgs   []string
	serverArgs []string
	agentURLs  map[string]string
}

// StartStack starts Prometheus, the server and one agent per node (in the
// node's network namespace, authenticated with a token bound to the
// agent DaemonSet's pod on that node), and waits until the server is ready.
// Env.Close stops them all.
func StartStack(ctx context.Context, env *Env, opts StackOptions) (*Stack, error) {
	if env.Topology == nil || len(env.Topology.Nodes) == 0 || env.Topology.Fabric == "" {
		return nil, errors.New("starting the stack: the environment has no network (EnvOptions.Network)")
	}
	if opts.FlushInterval == 0 {
		opts.FlushInterval = time.Second
	}
	if opts.PushInterval == 0 {
		opts.PushInterval = 2 * time.Second
	}
	s := &Stack{env: env, opts: opts, Agents: map[string]*Process{}}
	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	promAddr, srvAddr := "127.0.0.1:"+strconv.Itoa(ports[0]), "127.0.0.1:"+strconv.Itoa(ports[1])
	s.PrometheusURL, s.ServerURL = "http://"+promAddr, "http://"+srvAddr

	promDir := filepath.Join(env.Dir, "prometheus")
	if err := os.MkdirAll(promDir, 0o755); err != nil {
		return nil, err
	}
	var rules strings.Builder
	for _, f := range opts.RulesFiles {
		fmt.Fprintf(&rules, "  - %q\n", f)
	}
	cfg := "global:\n  evaluation_interval: 1s\n"
	if rules.Len() > 0 {
		cfg += "rule_files:\n" + rules.String()
	}
	cfgPath := filepath.Join(promDir, "prometheus.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	s.promArgs = PrometheusArgs(cfgPath, filepath.Join(promDir, "data"), promAddr)
	if err := s.StartPrometheus(); err != nil {
		return nil, err
	}
	if err := waitHTTP(ctx, s.PrometheusURL+"/-/ready", s.Prometheus); err != nil {
		return nil, err
	}

	s.serverArgs = []string{
		"server", "--kubeconfig", env.ServerKubeconfig,
		"--auth-mode", "tokenreview", "--token-audience", AgentTokenAudience,
		"--listen-address", srvAddr, "--log-format", "text",
		"--remote-write-url", s.PrometheusURL + "/api/v1/write",
		"--push-interval", opts.PushInterval.String(),
		"--remote-write-min-backoff", "200ms", "--remote-write-max-backoff", "2s",
		"--external-label", "cluster=testenv",
		"--flow-log-classes", "none",
	}
	if opts.StaticEndpoints != "" {
		path := filepath.Join(env.Dir, "static-endpoints.yaml")
		if err := os.WriteFile(path, []byte(opts.StaticEndpoints), 0o644); err != nil {
			return nil, err
		}
		s.serverArgs = append(s.serverArgs, "--static-endpoints-file", path)
	}
	s.serverArgs = append(s.serverArgs, opts.ServerArgs...)
	if err := s.StartServer(ctx); err != nil {
		return nil, err
	}

	agentPorts, err := freePorts(len(env.Topology.Nodes))
	if err != nil {
		return nil, err
	}
	s.agentURLs = map[string]string{}
	for i, n := range env.Topology.Nodes {
		token, err := env.AgentToken(ctx, n.Name)
		if err != nil {
			return nil, err
		}
		tokenFile := filepath.Join(env.Dir, "agent-"+n.Name+".token")
		if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
			return nil, err
		}
		// The agent runs in the host's namespace (as a DaemonSet with host
		// networking runs in the node's) so it reaches the server on
		// 127.0.0.1, and attaches its hooks in the node's namespace.
		p, err := env.StartProcess("agent/"+n.Name, opts.Bin, []string{
			"agent", "--server-url", s.ServerURL, "--node-name", n.Name,
			"--netns-path", n.NSPath(), "--kubeconfig", env.AgentKubeconfig,
			"--token-file", tokenFile, "--flush-interval", opts.FlushInterval.String(),
			"--listen-address", "127.0.0.1:" + strconv.Itoa(agentPorts[i]), "--log-format", "text",
			"--retry-min-backoff", "100ms", "--retry-max-backoff", "2s",
		}, ProcessOptions{Output: opts.Output})
		if err != nil {
			return nil, err
		}
		s.Agents[n.Name] = p
		s.agentURLs[n.Name] = "http://127.0.0.1:" + strconv.Itoa(agentPorts[i])
	}
	// Every agent has sent a batch once the server counts one per node.
	if err := s.waitAgents(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// StartPrometheus (re)starts Prometheus on the same port and storage.
func (s *Stack) StartPrometheus() error {
	p, err := s.env.StartProcess("prometheus", PrometheusBinary, s.promArgs, ProcessOptions{Output: s.opts.Output})
	if err != nil {
		return err
	}
	s.Prometheus = p
	return nil
}

// StartServer (re)starts the server and waits until it is ready.
func (s *Stack) StartServer(ctx context.Context) error {
	p, err := s.env.StartProcess("server", s.opts.Bin, s.serverArgs, ProcessOptions{Output: s.opts.Output})
	if err != nil {
		return err
	}
	s.Server = p
	return waitHTTP(ctx, s.ServerURL+"/readyz", p)
}

// waitAgents waits until every agent is ready: the server acknowledged a
// batch from it.
func (s *Stack) waitAgents(ctx context.Context) error {
	deadline := time.Now().Add(time.Minute)
	for {
		ready := 0
		for _, u := range s.agentURLs {
			if _, err := HTTPGet(ctx, u+"/readyz"); err == nil {
				ready++
			}
		}
		if ready == len(s.agentURLs) {
			return nil
		}
		for name, a := range s.Agents {
			select {
			case <-a.Done():
				return fmt.Errorf("agent on %s exited: %v; output:\n%s", name, a.Err(), a.Output())
			default:
			}
		}
		if time.Now().After(deadline) {
			var outs strings.Builder
			for name, a := range s.Agents {
				fmt.Fprintf(&outs, "agent %s:\n%s\n", name, a.Output())
			}
			return fmt.Errorf("not every agent reported to the server within a minute; server output:\n%s\n%s", s.Server.Output(), outs.String())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Sample is one series of a Prometheus instant query.
type Sample struct {
	Labels map[string]string
	Value  float64
}

// Query runs an instant PromQL query against the stack's Prometheus.
func (s *Stack) Query(ctx context.Context, q string) ([]Sample, error) {
	return s.QueryAt(ctx, q, time.Time{})
}

// QueryAt runs an instant query evaluated at t (now when zero).
func (s *Stack) QueryAt(ctx context.Context, q string, t time.Time) ([]Sample, error) {
	return QueryAPI(ctx, s.PrometheusURL, q, t)
}

// QueryAPI runs an instant query against the Prometheus HTTP API at base
// (Prometheus, or VictoriaMetrics, which serves the same API), evaluated
// at t (now when zero).
func QueryAPI(ctx context.Context, base, q string, t time.Time) ([]Sample, error) {
	u := base + "/api/v1/query?query=" + url.QueryEscape(q)
	if !t.IsZero() {
		u += fmt.Sprintf("&time=%.3f", float64(t.UnixMilli())/1000)
	}
	body, err := HTTPGet(ctx, u)
	if err != nil {
		return nil, err
	}
	var resp struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			ResultType string `json:"resultType"`
			Result     []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(body), &resp); err != nil {
		return nil, fmt.Errorf("query %q: %w", q, err)
	}
	if resp.Status != "success" {
		return nil, fmt.Errorf("query %q: %s", q, resp.Error)
	}
	out := make([]Sample, 0, len(resp.Data.Result))
	for _, r := range resp.Data.Result {
		str, _ := r.Value[1].(string)
		v, err := strconv.ParseFloat(str, 64)
		if err != nil {
			return nil, fmt.Errorf("query %q: value %q: %w", q, str, err)
		}
		out = append(out, Sample{Labels: r.Metric, Value: v})
	}
	return out, nil
}

// waitHTTP polls url until it answers 200, the process exits, or a minute
// passes.
func waitHTTP(ctx context.Context, u string, p *Process) error {
	deadline := time.Now().Add(time.Minute)
	var last error
	for time.Now().Before(deadline) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return err
		}
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Errorf("%s: %s", u, resp.Status)
		} else {
			last = err
		}
		select {
		case <-p.Done():
			return fmt.Errorf("waiting for %s: %w", u, p.p.failure())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("waiting for %s: %v; output:\n%s", u, last, p.Output())
}

// HTTPGet GETs u and returns the body of a 200 answer; any other status
// is an error quoting the body.
func HTTPGet(ctx context.Context, u string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s: %s", u, resp.Status, strings.TrimSpace(string(b)))
	}
	return string(b), nil
}
