package remotewrite

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/command"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/urfave/cli/v2"
)

// parseFlags runs a cli.App with Flags (and their environment twins, as
// the server command gives them) and returns what ConfigFromCLI made.
func parseFlags(t *testing.T, args ...string) (PusherConfig, error) {
	t.Helper()
	var cfg PusherConfig
	var cerr error
	app := &cli.App{Name: "test", Flags: command.WithEnv(Flags()), Action: func(c *cli.Context) error {
		cfg, cerr = ConfigFromCLI(c)
		return nil
	}}
	if err := app.Run(append([]string{"test"}, args...)); err != nil {
		return cfg, err
	}
	return cfg, cerr
}

func TestConfigFromCLI(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "rw.yaml")
	writeFile(t, file, []byte("endpoints:\n  - url: https://mimir/api/v1/push\n    name: mimir\n    headers: {X-Scope-OrgID: t1}\nexternal_labels: {region: eu}\n"))
	cfg, err := parseFlags(t,
		"--remote-write-url", "http://prom:9090/api/v1/write",
		"--remote-write-config", file,
		"--push-interval", "30s",
		"--external-label", "cluster=prod",
		"--remote-write-retry-on-429=false",
		"--remote-write-max-series-per-request", "500",
		"--remote-write-shards", "2",
		"--remote-write-ha-cluster", "prod", "--remote-write-ha-replica", "r1")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Endpoints) != 2 || cfg.Endpoints[0].Name != "prom:9090/api/v1/write" || cfg.Endpoints[1].Headers["X-Scope-OrgID"] != "t1" {
		t.Errorf("endpoints %+v", cfg.Endpoints)
	}
	wantLabels := []metrics.Label{{Name: "cluster", Value: "prod"}, {Name: "region", Value: "eu"}}
	if len(cfg.ExternalLabels) != 2 || cfg.ExternalLabels[0] != wantLabels[0] || cfg.ExternalLabels[1] != wantLabels[1] {
		t.Errorf("external labels %v, want %v", cfg.ExternalLabels, wantLabels)
	}
	if cfg.Interval != 30*time.Second || cfg.RetryOn429 || cfg.MaxSeriesPerRequest != 500 || cfg.Shards != 2 ||
		cfg.HA.Cluster != "prod" || cfg.HA.Replica != "r1" {
		t.Errorf("config %+v", cfg)
	}
}

func TestConfigFromCLIDefaultsAndEnv(t *testing.T) {
	t.Setenv("KUBEZONNET_REMOTE_WRITE_URL", "http://a/w,http://b/w")
	t.Setenv("KUBEZONNET_PUSH_INTERVAL", "5s")
	cfg, err := parseFlags(t)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Endpoints) != 2 || cfg.Interval != 5*time.Second {
		t.Errorf("env not applied: %+v", cfg)
	}
	if !cfg.RetryOn429 || cfg.MaxSeriesPerRequest != DefaultMaxSeriesPerRequest || cfg.Shards != DefaultShards ||
		cfg.Endpoints[0].Timeout != DefaultTimeout {
		t.Errorf("defaults not applied: %+v", cfg)
	}
}

func TestConfigFromCLIErrors(t *testing.T) {
	dir := t.TempDir()
	clash := filepath.Join(dir, "clash.yaml")
	writeFile(t, clash, []byte("external_labels: {cluster: other}\n"))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--external-label", "cluster"}, `--external-label "cluster": want name=value`},
		{[]string{"--external-label", "cluster=a", "--remote-write-config", clash}, `"cluster" is also set by --external-label`},
		{[]string{"--remote-write-url", "localhost:9090"}, `url "localhost:9090"`},
		{[]string{"--remote-write-shards", "0"}, "--remote-write-shards: must be between 1 and 256, got 0"},
		{[]string{"--remote-write-timeout", "0s"}, "--remote-write-timeout: must be positive, got 0s"},
		{[]string{"--remote-write-config", filepath.Join(dir, "nope.yaml")}, "--remote-write-config"},
		{[]string{"--push-interval", "often"}, "often"},
	} {
		_, err := parseFlags(t, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want one containing %q", tc.args, err, tc.want)
		}
	}
}
