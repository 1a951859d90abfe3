package server

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/kubezonnet/kubezonnet/server/flowlog"
)

// parse runs the server command's flag parsing on args and returns the
// config or the error.
func parse(t *testing.T, env map[string]string, args ...string) (Config, error) {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	var cfg Config
	var cfgErr error
	cmd := Command()
	cmd.Action = func(c *cli.Context) error {
		cfg, cfgErr = ConfigFromCLI(c)
		return nil
	}
	app := &cli.App{Commands: []*cli.Command{cmd}}
	if err := app.Run(append([]string{"kubezonnet", "server"}, args...)); err != nil {
		return cfg, err
	}
	return cfg, cfgErr
}

func TestConfig(t *testing.T) {
	tok := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tok, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := parse(t, nil, "--token-file", tok, "--remote-write-url", "http://127.0.0.1:9/api/v1/write")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ListenAddress != ":8080" || cfg.AuthMode != AuthToken || cfg.MaxPodPairs != 0 ||
		cfg.SeriesIdleTimeout != DefaultSeriesIdleTimeout || cfg.AllPairs || cfg.KeepOnly {
		t.Errorf("defaults: %+v", cfg)
	}
	if want, _ := flowlog.ParseClasses([]string{"cross-zone"}); cfg.FlowLogClasses != want {
		t.Errorf("flow log classes = %b, want %b", cfg.FlowLogClasses, want)
	}

	cfg, err = parse(t, map[string]string{"KUBEZONNET_MAX_POD_PAIRS": "42", "KUBEZONNET_AUTH_MODE": "none",
		"KUBEZONNET_FLOW_LOG_CLASSES": "cross-zone,external"}, "--all-pairs", "--keep-only")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.MaxPodPairs != 42 || cfg.AuthMode != AuthNone || !cfg.AllPairs {
		t.Errorf("env twins not applied: %+v", cfg)
	}
	if want, _ := flowlog.ParseClasses([]string{"cross-zone", "external"}); cfg.FlowLogClasses != want {
		t.Errorf("flow log classes from env = %b, want %b", cfg.FlowLogClasses, want)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--auth-mode", "token"}, "--token-file: required"},
		{[]string{"--auth-mode", "magic"}, `--auth-mode "magic"`},
		{[]string{"--auth-mode", "tokenreview", "--agent-service-account", "nocolon"}, `--agent-service-account "nocolon"`},
		{[]string{"--auth-mode", "none", "--max-pod-pairs", "-1"}, "--max-pod-pairs -1: must not be negative"},
		{[]string{"--auth-mode", "none", "--series-idle-timeout", "-1s"}, "--series-idle-timeout -1s"},
		{[]string{"--auth-mode", "none", "--flow-log-classes", "cross_zone"}, `--flow-log-classes "cross_zone"`},
		{[]string{"--auth-mode", "none", "--log-level", "loud"}, `invalid log level "loud"`},
		{[]string{"--auth-mode", "none", "--released-ip-ttl", "0s"}, "--released-ip-ttl must be positive"},
		{[]string{"--auth-mode", "none", "--remote-write-url", "::bad"}, "::bad"},
	} {
		_, err := parse(t, nil, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: err %v, want it to contain %q", tc.args, err, tc.want)
		}
	}
}

// TestConfigRemoteWriteEndpoint: a server with nowhere to push starts only
// when --keep-only asks for it, and --keep-only with an endpoint is a
// contradiction.
func TestConfigRemoteWriteEndpoint(t *testing.T) {
	rwConfig := filepath.Join(t.TempDir(), "remote-write.yaml")
	if err := os.WriteFile(rwConfig, []byte("endpoints:\n  - name: p\n    url: http://127.0.0.1:9/api/v1/write\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const noEndpoint = "no remote-write endpoint: set --remote-write-url or --remote-write-config (or --keep-only to run without pushing)"
	for _, tc := range []struct {
		name     string
		env      map[string]string
		args     []string
		keepOnly bool
		wantErr  string // "" for a valid configuration
	}{
		{name: "no endpoint", wantErr: noEndpoint},
		{name: "no endpoint, flow logs to a file", args: []string{"--flow-log-file", "/dev/null"}, wantErr: noEndpoint},
		{name: "--keep-only", args: []string{"--keep-only"}, keepOnly: true},
		{name: "KUBEZONNET_KEEP_ONLY", env: map[string]string{"KUBEZONNET_KEEP_ONLY": "true"}, keepOnly: true},
		{name: "--keep-only=false", args: []string{"--keep-only=false"}, wantErr: noEndpoint},
		{name: "--remote-write-url", args: []string{"--remote-write-url", "http://127.0.0.1:9/api/v1/write"}},
		{name: "--remote-write-config", args: []string{"--remote-write-config", rwConfig}},
		{name: "KUBEZONNET_REMOTE_WRITE_URL", env: map[string]string{"KUBEZONNET_REMOTE_WRITE_URL": "http://127.0.0.1:9/api/v1/write"}},
		{name: "--keep-only and --remote-write-url", args: []string{"--keep-only", "--remote-write-url", "http://127.0.0.1:9/api/v1/write"},
			wantErr: "--keep-only: conflicts with the 1 remote-write endpoint(s)"},
		{name: "--keep-only and --remote-write-config", args: []string{"--keep-only", "--remote-write-config", rwConfig},
			wantErr: "--keep-only: conflicts with the 1 remote-write endpoint(s)"},
		{name: "KUBEZONNET_KEEP_ONLY and --remote-write-url", env: map[string]string{"KUBEZONNET_KEEP_ONLY": "1"},
			args: []string{"--remote-write-url", "http://127.0.0.1:9/api/v1/write"}, wantErr: "--keep-only: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := parse(t, tc.env, append([]string{"--auth-mode", "none"}, tc.args...)...)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("err %v, want none", err)
				}
				if cfg.KeepOnly != tc.keepOnly {
					t.Errorf("KeepOnly = %v, want %v", cfg.KeepOnly, tc.keepOnly)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("err %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}
