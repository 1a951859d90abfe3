package deploy

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
)

// grafanaBuiltins are the variables Grafana defines itself.
var grafanaBuiltins = []string{"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s"}

// TestDashboardQueriesParse: every query of the dashboard is valid PromQL
// once Grafana's variables are expanded, uses only variables that exist,
// and reads only kubezonnet's series and recording rules.
func TestDashboardQueriesParse(t *testing.T) {
	qs, vars, err := DashboardQueries()
	if err != nil {
		t.Fatal(err)
	}
	if len(qs) < 10 {
		t.Fatalf("only %d queries in the dashboard", len(qs))
	}
	allowed := slices.Clone(knownSeries)
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			if r.Record != "" {
				allowed = append(allowed, r.Record)
			}
		}
	}
	for _, q := range qs {
		where := q.Panel + " / " + q.RefID
		if strings.TrimSpace(q.Expr) == "" {
			t.Errorf("%s: empty query", where)
			continue
		}
		for _, v := range GrafanaVariables(q.Expr) {
			if !slices.Contains(grafanaBuiltins, v) && !slices.Contains(vars, v) {
				t.Errorf("%s: variable $%s is not defined", where, v)
			}
		}
		expr := q.Expr
		if strings.HasPrefix(q.Panel, "variable ") {
			// label_values(metric, label) is Grafana's, not PromQL; its
			// first argument is a series selector.
			inner, ok := strings.CutPrefix(expr, "label_values(")
			if !ok {
				t.Errorf("%s: %q is not label_values(...)", where, expr)
				continue
			}
			expr, _, _ = strings.Cut(inner, ",")
		}
		expr = ExpandGrafanaVariables(expr)
		if _, err := promql.ParseExpr(expr); err != nil {
			t.Errorf("%s: %q: %v", where, expr, err)
			continue
		}
		for _, name := range metricNames(t, expr) {
			if !slices.Contains(allowed, name) {
				t.Errorf("%s: queries %s, neither a kubezonnet series nor a recording rule", where, name)
			}
		}
	}
}

// TestDashboardPanels: the dashboard has the views the product promises,
// each with at least one query.
func TestDashboardPanels(t *testing.T) {
	b, err := Files.ReadFile(DashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		UID    string `json:"uid"`
		Panels []struct {
			Title           string `json:"title"`
			Type            string `json:"type"`
			Targets         []any  `json:"targets"`
			Transformations []struct {
				ID string `json:"id"`
			} `json:"transformations"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	if d.UID == "" {
		t.Error("dashboard has no uid (provisioned copies would duplicate)")
	}
	want := map[string]string{ // title prefix -> required transformation ("" for none)
		"Zone-pair matrix":                 "groupingToMatrix",
		"Top cross-zone workload pairs":    "",
		"Top cross-zone sending pods":      "",
		"Estimated traffic cost":           "",
		"Monthly cost by workload pair":    "",
		"Seconds since each agent's last":  "",
		"Remote-write samples":             "",
		"Unresolved flows":                 "",
		"Dropped bytes":                    "",
		"Services by avoidable cross-zone": "merge",
		"Avoidable cross-zone bytes/s":     "",
	}
	for prefix, transform := range want {
		found := false
		for _, p := range d.Panels {
			if !strings.HasPrefix(p.Title, prefix) || p.Type == "row" {
				continue
			}
			found = true
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			if transform != "" && !slices.ContainsFunc(p.Transformations, func(tr struct {
				ID string `json:"id"`
			}) bool {
				return tr.ID == transform
			}) {
				t.Errorf("panel %q lacks the %s transformation", p.Title, transform)
			}
		}
		if !found {
			t.Errorf("no panel titled %q...", prefix)
		}
	}
}

// TestExpandGrafanaVariables covers the variable syntaxes Grafana accepts.
func TestExpandGrafanaVariables(t *testing.T) {
	tests := []struct{ in, want string }{
		{`rate(x[$__rate_interval])`, `rate(x[5m])`},
		{`rate(x[${__range}])`, `rate(x[5m])`},
		{`x{ns=~"$namespace"}`, `x{ns=~".*"}`},
		{`x{ns=~"${namespace:regex}"}`, `x{ns=~".*"}`},
		{`x{ns=~"[[namespace]]"}`, `x{ns=~".*"}`},
		{`x / $__range_s`, `x / 300`},
		{`sum(x)`, `sum(x)`},
	}
	for _, tt := range tests {
		if got := ExpandGrafanaVariables(tt.in); got != tt.want {
			t.Errorf("ExpandGrafanaVariables(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
