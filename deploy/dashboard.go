package deploy

import (
	"encoding/json"
	"fmt"
	"regexp"
)

// DashboardFile is the Grafana dashboard, relative to deploy/.
const DashboardFile = "dashboards/kubezonnet.json"

// DashboardQuery is one PromQL query of the dashboard, with where it sits
// so that a failure names the panel.
type DashboardQuery struct {
	Panel string // panel title, or "variable <name>" for a templating query
	RefID string
	Expr  string // as written in the dashboard, Grafana variables included
}

// dashboard is the part of Grafana's dashboard model the checks need.
type dashboard struct {
	Panels     []dashboardPanel `json:"panels"`
	Templating struct {
		List []struct {
			Name  string          `json:"name"`
			Type  string          `json:"type"`
			Query json.RawMessage `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

type dashboardPanel struct {
	Title   string           `json:"title"`
	Type    string           `json:"type"`
	Targets []dashboardQuery `json:"targets"`
	Panels  []dashboardPanel `json:"panels"` // rows collapsed in Grafana nest their panels
}

type dashboardQuery struct {
	RefID string `json:"refId"`
	Expr  string `json:"expr"`
}

// DashboardQueries returns every PromQL query of the embedded dashboard
// (panel targets, rows included, and templating queries) and the names of
// the dashboard's variables. The end-to-end environment runs the queries,
// after ExpandGrafanaVariables, against a real Prometheus to check that
// each returns data; a templating query is Grafana's label_values(selector,
// label), of which only the selector is PromQL.
func DashboardQueries() ([]DashboardQuery, []string, error) {
	b, err := Files.ReadFile(DashboardFile)
	if err != nil {
		return nil, nil, err
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, nil, fmt.Errorf("decoding %s: %w", DashboardFile, err)
	}
	var qs []DashboardQuery
	var walk func([]dashboardPanel)
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			for _, t := range p.Targets {
				qs = append(qs, DashboardQuery{Panel: p.Title, RefID: t.RefID, Expr: t.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	var vars []string
	for _, v := range d.Templating.List {
		vars = append(vars, v.Name)
		if v.Type != "query" {
			continue
		}
		var q struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(v.Query, &q); err != nil {
			return nil, nil, fmt.Errorf("decoding the query of variable %s: %w", v.Name, err)
		}
		qs = append(qs, DashboardQuery{Panel: "variable " + v.Name, RefID: v.Name, Expr: q.Query})
	}
	return qs, vars, nil
}

// grafanaVariable matches $name, ${name}, ${name:format} and [[name]].
var grafanaVariable = regexp.MustCompile(`\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]`)

// GrafanaVariables returns the names of the variables expr uses, builtin
// ($__rate_interval) or dashboard-defined ($namespace).
func GrafanaVariables(expr string) []string {
	var names []string
	for _, m := range grafanaVariable.FindAllStringSubmatch(expr, -1) {
		names = append(names, m[1]+m[2]+m[3])
	}
	return names
}

// ExpandGrafanaVariables replaces Grafana variables with values that make
// expr plain PromQL: duration variables with 5m, numeric ones with 300, the
// rest with ".*" (dashboard variables only occur inside
// =~ matchers, where ".*" is what "All" expands to). The result runs
// against a real Prometheus as well as it parses.
func ExpandGrafanaVariables(expr string) string {
	return grafanaVariable.ReplaceAllStringFunc(expr, func(v string) string {
		name := GrafanaVariables(v)[0]
		switch name {
		case "__rate_interval", "__interval", "__range":
			return "5m"
		case "__range_s", "__interval_ms": // plain numbers in arithmetic
			return "300"
		}
		return ".*"
	})
}
