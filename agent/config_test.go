package agent

import (
	"context"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/kubezonnet/kubezonnet/bpf"
)

// parse runs the agent's flag set over args, as the binary does.
func parse(t *testing.T, args ...string) (Config, error) {
	t.Helper()
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	for _, f := range Flags() {
		if err := f.Apply(fs); err != nil {
			t.Fatal(err)
		}
	}
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	return ConfigFromCLI(cli.NewContext(cli.NewApp(), fs, nil))
}

func TestConfigErrorsNameTheFlag(t *testing.T) {
	ok := []string{"--server-url", "http://server:8080", "--node-name", "n1", "--local-prefixes", "10.0.0.0/24"}
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"valid", ok, ""},
		{"valid auto prefixes", []string{"--server-url", "https://s", "--node-name", "n1"}, ""},
		{"missing server", []string{"--node-name", "n1"}, "--server-url: required"},
		{"bad server url", append(ok, "--server-url", "server:8080"), "--server-url: invalid URL"},
		{"missing node name", []string{"--server-url", "http://s"}, "--node-name: required"},
		{"unknown attach mode", append(ok, "--attach-mode", "xdp"), `--attach-mode: unknown mode "xdp"`},
		{"invalid CIDR", append(ok, "--local-prefixes", "10.0.0.0/33"), `--local-prefixes: invalid CIDR "10.0.0.0/33"`},
		{"invalid extra CIDR", append(ok, "--extra-local-prefixes", "nope"), `--extra-local-prefixes: invalid CIDR "nope"`},
		{"flush too short", append(ok, "--flush-interval", "1ms"), "--flush-interval: 1ms is below"},
		{"max flows zero", append(ok, "--max-flows", "0"), "--max-flows: 0 out of range"},
		{"table memory not a power of two", append(ok, "--flow-table-memory", "100"), ""},
		{"table memory at the maximum", append(ok, "--flow-table-memory", "2048"), ""},
		{"table memory zero", append(ok, "--flow-table-memory", "0"), "--flow-table-memory: 0 MiB out of range [1, 2048]"},
		{"table memory negative", append(ok, "--flow-table-memory", "-1"), "--flow-table-memory: -1 MiB out of range"},
		{"table memory too large", append(ok, "--flow-table-memory", "2049"), "--flow-table-memory: 2049 MiB out of range"},
		{"table memory not a number", append(ok, "--flow-table-memory", "64Mi"), "flow-table-memory"},
		{"buffer zero", append(ok, "--max-buffered-flows", "0"), "--max-buffered-flows: 0 must be positive"},
		{"missing token file", append(ok, "--token-file", "/nonexistent/token"), "--token-file:"},
		{"missing netns", append(ok, "--netns-path", "/nonexistent/ns"), "--netns-path:"},
		{"netns with cgroup", append(ok, "--attach-mode", "cgroup", "--netns-path", "/proc/self/ns/net"), "--netns-path: only valid"},
		{"bad log level", append(ok, "--log-level", "loud"), "--log-level:"},
		{"bad log format", append(ok, "--log-format", "xml"), "--log-format: invalid log format"},
		{"backoff inverted", append(ok, "--retry-min-backoff", "10s", "--retry-max-backoff", "1s"), "want 0 < min <= max"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parse(t, tt.args...)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestFlowTableMemory: the flag is MiB, its default the datapath's, and
// the datapath gets it in bytes.
func TestFlowTableMemory(t *testing.T) {
	base := []string{"--server-url", "http://s", "--node-name", "n1", "--local-prefixes", "10.0.0.0/24"}
	for _, tt := range []struct {
		args []string
		want uint64
	}{
		{base, bpf.DefaultTableMemory},
		{append(base, "--flow-table-memory", "100"), 100 << 20},
	} {
		cfg, err := parse(t, tt.args...)
		if err != nil {
			t.Fatal(err)
		}
		if got := cfg.datapathConfig(); got.TableMemory != tt.want || got.MaxFlows != bpf.DefaultMaxFlows {
			t.Errorf("%v: datapath config %+v, want TableMemory %d", tt.args, got, tt.want)
		}
	}
}

func TestEnvironmentTwins(t *testing.T) {
	t.Setenv("KUBEZONNET_SERVER_URL", "http://from-env:1")
	t.Setenv("KUBEZONNET_NODE_NAME", "env-node")
	t.Setenv("KUBEZONNET_FLUSH_INTERVAL", "3s")
	t.Setenv("KUBEZONNET_LOCAL_PREFIXES", "10.1.0.0/16,fd00::/64")
	cfg, err := parse(t)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ServerURL != "http://from-env:1" || cfg.NodeName != "env-node" || cfg.FlushInterval != 3*time.Second || len(cfg.LocalPrefixes) != 2 {
		t.Errorf("config from environment: %+v", cfg)
	}
	for _, f := range Flags() {
		name := f.Names()[0]
		want := "KUBEZONNET_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
		ev, ok := f.(interface{ GetEnvVars() []string })
		if !ok || len(ev.GetEnvVars()) != 1 || ev.GetEnvVars()[0] != want {
			t.Errorf("flag --%s: environment variable twin is not %s", name, want)
		}
	}
}

// TestRunFailsClearly runs the real code paths that must fail before any
// traffic is counted: an API server that does not answer, and a kernel
// that refuses to load the program (an unprivileged process).
func TestRunFailsClearly(t *testing.T) {
	t.Run("unreachable API server", func(t *testing.T) {
		kc := filepath.Join(t.TempDir(), "kubeconfig")
		os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600)
		cfg := testConfig("http://127.0.0.1:1")
		cfg.LocalPrefixes = nil
		cfg.Kubeconfig = kc
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := run(ctx, cfg, discardLogger())
		if err == nil || !strings.Contains(err.Error(), "reading node node-a from the Kubernetes API") {
			t.Fatalf("run() = %v, want an error about reading the node", err)
		}
	})
	t.Run("kernel refuses to load", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("SKIP-PRIVILEGED: needs root to drop to an unprivileged user")
		}
		if _, err := exec.LookPath("setpriv"); err != nil {
			t.Fatalf("setpriv (util-linux) is needed: %v", err)
		}
		bin := kubezonnetBinary(t)
		out, err := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
			bin, "agent", "--server-url", "http://127.0.0.1:1", "--node-name", "n", "--local-prefixes", "10.0.0.0/8", "--listen-address", "").CombinedOutput()
		if err == nil {
			t.Fatalf("agent without privileges exited 0:\n%s", out)
		}
		if !strings.Contains(string(out), "loading eBPF needs root") || strings.Contains(string(out), "panic") {
			t.Fatalf("unclear failure:\n%s", out)
		}
		t.Logf("%s", out)
	})
}
