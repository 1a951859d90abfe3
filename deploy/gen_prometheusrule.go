//go:build ignore

// gen_prometheusrule writes prometheus-operator/prometheusrule.yaml from
// rules/kubezonnet.rules.yaml; run it with `go generate ./deploy`.
package main

import (
	"log"
	"os"

	"github.com/kubezonnet/kubezonnet/deploy"
)

func main() {
	rules, err := os.ReadFile(deploy.RulesFile)
	if err != nil {
		log.Fatal(err)
	}
	if err := os.WriteFile(deploy.PrometheusRuleFile, deploy.PrometheusRule(rules), 0o644); err != nil {
		log.Fatal(err)
	}
}
