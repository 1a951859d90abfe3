package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/yaml"
)

// knownSeries are the series kubezonnet pushes that the rules and the
// dashboard may query: the data series of the shared contract and the
// self-metrics of agents (forwarded by the server) and server. A query of
// anything else is a typo or an undocumented dependency.
var knownSeries = []string{
	"kubezonnet_pod_pair_bytes_total",
	"kubezonnet_zone_pair_bytes_total",
	"kubezonnet_service_bytes_total",
	"kubezonnet_service_packets_total",
	"kubezonnet_agent_last_send_timestamp_seconds",
	"kubezonnet_agent_flows_total",
	"kubezonnet_agent_dropped_bytes_total",
	"kubezonnet_agent_send_failures_total",
	"kubezonnet_server_flows_total",
	"kubezonnet_server_unresolved_total",
	"kubezonnet_server_pod_pairs_folded_total",
	"kubezonnet_server_remote_write_samples_total",
	"kubezonnet_server_remote_write_last_success_timestamp_seconds",
	"kubezonnet_server_remote_write_delivered_snapshot_timestamp_seconds",
}

// ruleFile is the part of a Prometheus rule file the checks read.
type ruleFile struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Record string `json:"record"`
			Alert  string `json:"alert"`
			Expr   string `json:"expr"`
		} `json:"rules"`
	} `json:"groups"`
}

func loadRules(t *testing.T) ruleFile {
	t.Helper()
	b, err := Files.ReadFile(RulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile // only what the checks read; promtool checks the rest
	if err := yaml.Unmarshal(b, &rf); err != nil {
		t.Fatalf("%s: %v", RulesFile, err)
	}
	if len(rf.Groups) == 0 {
		t.Fatalf("%s has no groups", RulesFile)
	}
	return rf
}

// TestPromtool runs `promtool check rules` on the rule file and on the
// PrometheusRule's spec, and `promtool test rules` on the unit tests.
func TestPromtool(t *testing.T) {
	promtool := requireTool(t, "promtool", "the Debian package prometheus")
	spec := prometheusRuleSpec(t)
	specFile := filepath.Join(t.TempDir(), "prometheusrule-spec.yaml")
	if err := os.WriteFile(specFile, spec, 0o644); err != nil {
		t.Fatal(err)
	}
	tests, err := filepath.Glob("rules/*_test.yaml")
	if err != nil || len(tests) == 0 {
		t.Fatalf("no rules/*_test.yaml (%v)", err)
	}
	runs := [][]string{
		{"check", "rules", RulesFile},
		{"check", "rules", specFile},
		append([]string{"test", "rules"}, tests...),
	}
	for _, args := range runs {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// prometheusRuleSpec returns the spec of the committed PrometheusRule as
// YAML, which is a plain rule file.
func prometheusRuleSpec(t *testing.T) []byte {
	t.Helper()
	b, err := Files.ReadFile(PrometheusRuleFile)
	if err != nil {
		t.Fatal(err)
	}
	var obj struct {
		APIVersion string         `json:"apiVersion"`
		Kind       string         `json:"kind"`
		Metadata   map[string]any `json:"metadata"`
		Spec       map[string]any `json:"spec"`
	}
	if err := yaml.UnmarshalStrict(b, &obj); err != nil {
		t.Fatalf("%s: %v", PrometheusRuleFile, err)
	}
	if obj.APIVersion != PrometheusRuleGVK.GroupVersion().String() || obj.Kind != PrometheusRuleGVK.Kind {
		t.Fatalf("%s is a %s %s", PrometheusRuleFile, obj.APIVersion, obj.Kind)
	}
	spec, err := yaml.Marshal(obj.Spec)
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

// TestPrometheusRuleInSync: the committed PrometheusRule is exactly what
// `go generate` makes of the rule file, and means the same rules.
func TestPrometheusRuleInSync(t *testing.T) {
	rules, err := Files.ReadFile(RulesFile)
	if err != nil {
		t.Fatal(err)
	}
	committed, err := Files.ReadFile(PrometheusRuleFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(committed, PrometheusRule(rules)) {
		t.Errorf("%s is stale; run `go generate ./deploy`", PrometheusRuleFile)
	}
	// Independently of the text transformation: the spec decodes to the
	// same value as the rule file.
	var fromFile, fromSpec any
	if err := yaml.Unmarshal(rules, &fromFile); err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(prometheusRuleSpec(t), &fromSpec); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(fromFile, fromSpec) {
		t.Errorf("the spec of %s differs from %s", PrometheusRuleFile, RulesFile)
	}
}

// TestPrometheusRuleRendering checks the transformation on edge cases the
// real file may not have today.
func TestPrometheusRuleRendering(t *testing.T) {
	tests := []struct{ name, in string }{
		{"block scalar", "groups:\n  - name: g\n    rules:\n      - record: r\n        expr: |\n          sum(x)\n\n          + 1\n"},
		{"no final newline", "groups:\n  - name: g\n    rules:\n      - record: r\n        expr: vector(1)"},
		{"comments", "# top\ngroups: # inline\n  - name: g\n    rules: []\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var want, got struct {
				Spec any `json:"spec"`
			}
			if err := yaml.Unmarshal([]byte(tt.in), &want.Spec); err != nil {
				t.Fatal(err)
			}
			if err := yaml.Unmarshal(PrometheusRule([]byte(tt.in)), &got); err != nil {
				t.Fatalf("rendering does not parse: %v\n%s", err, PrometheusRule([]byte(tt.in)))
			}
			if !reflect.DeepEqual(want, got) {
				t.Errorf("spec %#v, want %#v", got.Spec, want.Spec)
			}
		})
	}
}

// unitTests is the part of promtool's test file format the coverage check
// reads.
type unitTests struct {
	Tests []struct {
		Name          string `json:"name"`
		AlertRuleTest []struct {
			Alertname string `json:"alertname"`
			ExpAlerts []any  `json:"exp_alerts"`
		} `json:"alert_rule_test"`
		PromQLExprTest []struct {
			Expr string `json:"expr"`
		} `json:"promql_expr_test"`
	} `json:"tests"`
}

// TestEveryRuleUnitTested: each alert has a promtool case where it fires
// and one where it does not; each recording rule is queried in a case.
func TestEveryRuleUnitTested(t *testing.T) {
	rf := loadRules(t)
	files, err := filepath.Glob("rules/*_test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	fires, silent, queried := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var ut unitTests
		if err := yaml.Unmarshal(b, &ut); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, tc := range ut.Tests {
			for _, a := range tc.AlertRuleTest {
				if len(a.ExpAlerts) > 0 {
					fires[a.Alertname] = true
				} else {
					silent[a.Alertname] = true
				}
			}
			for _, e := range tc.PromQLExprTest {
				for _, name := range metricNames(t, e.Expr) {
					queried[name] = true
				}
			}
		}
	}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			switch {
			case r.Alert != "" && !fires[r.Alert]:
				t.Errorf("alert %s never fires in a unit test", r.Alert)
			case r.Alert != "" && !silent[r.Alert]:
				t.Errorf("alert %s is never tested to stay silent", r.Alert)
			case r.Record != "" && !queried[r.Record]:
				t.Errorf("recording rule %s is not checked by a promql_expr_test", r.Record)
			}
		}
	}
}

// TestRulesQueryKnownSeries: rules query only kubezonnet's series (each
// documented in the rule file's header comment) and recorded ones.
func TestRulesQueryKnownSeries(t *testing.T) {
	rf := loadRules(t)
	raw, err := Files.ReadFile(RulesFile)
	if err != nil {
		t.Fatal(err)
	}
	allowed := slices.Clone(knownSeries)
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if r.Record != "" {
				allowed = append(allowed, r.Record)
			}
		}
	}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			for _, name := range metricNames(t, r.Expr) {
				if !slices.Contains(allowed, name) {
					t.Errorf("rule %s%s queries %s, which kubezonnet does not push", r.Record, r.Alert, name)
				}
				if slices.Contains(knownSeries, name) && !bytes.Contains(raw, []byte("#   "+name)) {
					t.Errorf("rule %s%s relies on %s, undocumented in the header of %s", r.Record, r.Alert, name, RulesFile)
				}
			}
		}
	}
}

// metricNames parses expr and returns the metric names it selects.
func metricNames(t *testing.T, expr string) []string {
	t.Helper()
	e, err := promql.ParseExpr(expr)
	if err != nil {
		t.Errorf("%q: %v", expr, err)
		return nil
	}
	var names []string
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			if vs.Name == "" {
				t.Errorf("%q: selector %s names no metric", expr, vs)
			}
			names = append(names, vs.Name)
		}
		return nil
	})
	return names
}

// promql is the parser with default options, i.e. the PromQL a Prometheus
// without feature flags accepts (experimental functions are rejected).
var promql = parser.NewParser(parser.Options{})
