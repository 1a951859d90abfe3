package main

import (
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// rulePrices reads the per-class prices (kubezonnet:price_per_gib) out of
// the shipped rule file, the one place they are set.
func rulePrices(t *testing.T, rulesFile string) map[string]float64 {
	t.Helper()
	data, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf struct {
		Groups []struct {
			Rules []struct {
				Record string            `json:"record"`
				Expr   string            `json:"expr"`
				Labels map[string]string `json:"labels"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.Unmarshal(data, &rf); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	prices := map[string]float64{}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if r.Record != "kubezonnet:price_per_gib" {
				continue
			}
			v, ok := strings.CutPrefix(strings.TrimSpace(r.Expr), "vector(")
			if !ok || !strings.HasSuffix(v, ")") {
				t.Fatalf("price for class %q is %q, want vector(<number>)", r.Labels["class"], r.Expr)
			}
			if prices[r.Labels["class"]], err = strconv.ParseFloat(strings.TrimSuffix(v, ")"), 64); err != nil {
				t.Fatalf("price for class %q: %v", r.Labels["class"], err)
			}
		}
	}
	return prices
}

// TestCostMatchesRules: for one series at a steady rate, the monthly cost
// the demo prints equals what the recording rule
// kubezonnet:workload_pair_monthly_cost:usd (and the dashboard built on
// it) computes in promtool, for every priced class.
func TestCostMatchesRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Geteuid() == 0 {
			t.Fatalf("promtool not found (%v); install the Debian package prometheus", err)
		}
		t.Skipf("promtool not found (%v); install the Debian package prometheus", err)
	}
	root, err := testutil.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	rulesFile := filepath.Join(root, "deploy", "rules", "kubezonnet.rules.yaml")
	prices := rulePrices(t, rulesFile)
	for _, class := range []string{"cross-zone", "cross-region", "external"} {
		if prices[class] <= 0 {
			t.Errorf("the rules price class %q at %v, want a price", class, prices[class])
		}
	}

	// 12,345 bytes a minute for 20 minutes; the demo's figure is over the
	// 10 minutes before the evaluation, the rule's over its 5m window.
	const perMinute = 12345
	var tests strings.Builder
	fmt.Fprintf(&tests, "rule_files:\n  - %s\nevaluation_interval: 1m\ntests:\n", rulesFile)
	for _, class := range []string{"cross-zone", "cross-region", "external"} {
		demo := monthlyCost(perMinute*10, 10*time.Minute, prices[class])
		fmt.Fprintf(&tests, `  - interval: 1m
    input_series:
      - series: 'kubezonnet_pod_pair_bytes_total{class=%q,src_namespace="shop",src_workload="api",src_workload_kind="Deployment",src_zone="a",dst_namespace="db",dst_workload="pg",dst_workload_kind="StatefulSet",dst_zone="b"}'
        values: '0+%dx20'
    promql_expr_test:
      - expr: round(kubezonnet:workload_pair_monthly_cost:usd * 1e9)
        eval_time: 15m
        exp_samples:
          - labels: '{class=%q,src_namespace="shop",src_workload="api",src_workload_kind="Deployment",src_zone="a",dst_namespace="db",dst_workload="pg",dst_workload_kind="StatefulSet",dst_zone="b"}'
            value: %.0f
`, class, perMinute, class, math.Round(demo*1e9))
	}
	file := filepath.Join(t.TempDir(), "cost_test.yaml")
	if err := os.WriteFile(file, []byte(tests.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "test", "rules", file).CombinedOutput(); err != nil {
		t.Errorf("the demo's monthly cost differs from the rules' (promtool test rules: %v):\n%s\n%s", err, out, tests.String())
	}
}

// TestDemoWithoutTerminal runs the demo as `make demo` does on a machine
// without a terminal (stdin not a TTY): it must print its report, say the
// cluster is removed instead of advertising Prometheus' address, remove
// everything and exit 0. A short traffic phase keeps it quick; the report
// is the real one.
func TestDemoWithoutTerminal(t *testing.T) {
	testutil.RequireRoot(t)
	if testing.Short() {
		t.Skip("runs a whole simulated cluster; not with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bin, err := testutil.BuildKubezonnet(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	demo := filepath.Join(dir, "demo")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", demo, ".").CombinedOutput(); err != nil {
		t.Fatalf("building the demo: %v\n%s", err, out)
	}
	cmd := exec.CommandContext(ctx, demo, "-bin", bin, "-duration", "10s")
	cmd.Stdin = nil // /dev/null: not a terminal
	var out testutil.SyncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGINT) }
	cmd.WaitDelay = time.Minute
	if err := cmd.Run(); err != nil {
		t.Fatalf("demo without a terminal: %v, want exit 0\n%s", err, out.String())
	}
	got := out.String()
	for _, want := range []string{
		"Bytes by zone pair",
		"Top cross-zone workload pairs",
		"USD/MONTH AT THIS RATE",
		"No terminal: the cluster is removed",
		"==> cleaning up",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("the demo's output lacks %q:\n%s", want, got)
		}
	}
	for _, unwanted := range []string{"Prometheus is at", "press Ctrl-C"} {
		if strings.Contains(got, unwanted) {
			t.Errorf("the demo advertises %q although it is removing the cluster:\n%s", unwanted, got)
		}
	}
}
