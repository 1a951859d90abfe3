package testenv

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/deploy"
)

// prometheusRuleCRD is a minimal PrometheusRule CRD (the Prometheus
// Operator's group, kind and version, schema left open): enough for the
// API server to accept the PrometheusRule object in a server-side dry run.
// The rules themselves are checked by promtool in deploy/'s tests.
const prometheusRuleCRD = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: prometheusrules.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  names: {kind: PrometheusRule, listKind: PrometheusRuleList, plural: prometheusrules, singular: prometheusrule}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
`

// TestManifestsServerDryRun: every kustomization of deploy/, rendered as a
// user would apply it, is accepted by a real API server
// (kubectl apply --dry-run=server: admission, validation and defaulting
// run, nothing is stored). The API server is a fresh one, as a cluster
// without kubezonnet would be (the shared one holds the simulated
// cluster's own agent DaemonSet).
func TestManifestsServerDryRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cp, err := StartControlPlane(ctx, Options{Binaries: testBinaries(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cp.Stop() })
	kubeconfig := filepath.Join(t.TempDir(), "admin.kubeconfig")
	if err := cp.WriteKubeconfig(kubeconfig, cp.adminToken); err != nil {
		t.Fatal(err)
	}
	kubectl := func(stdin []byte, args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, deploy.Kubectl(), append([]string{"--kubeconfig", kubeconfig}, args...)...)
		cmd.Stdin = bytes.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := kubectl([]byte(prometheusRuleCRD), "apply", "-f", "-"); err != nil {
		t.Fatalf("installing the PrometheusRule CRD: %v\n%s", err, out)
	}
	// Wait until the CRD is served.
	for {
		if out, err := kubectl(nil, "get", "prometheusrules", "-A"); err == nil {
			break
		} else if ctx.Err() != nil {
			t.Fatalf("PrometheusRule CRD never served: %s", out)
		}
		time.Sleep(200 * time.Millisecond) // the poll interval (ctx is the deadline)
	}
	// Namespaced objects need their namespace to exist even in a dry run.
	if out, err := kubectl(nil, "create", "namespace", Namespace); err != nil {
		t.Fatalf("creating namespace %s: %v\n%s", Namespace, err, out)
	}
	for _, dir := range deploy.Kustomizations {
		t.Run(dir, func(t *testing.T) {
			rendered, err := deploy.Render(ctx, dir)
			if err != nil {
				t.Fatal(err)
			}
			out, err := kubectl(rendered, "apply", "--dry-run=server", "-f", "-")
			if err != nil {
				t.Fatalf("the API server refused deploy/%s: %v\n%s", dir, err, out)
			}
			if !strings.Contains(out, "(server dry run)") {
				t.Fatalf("no object applied for deploy/%s:\n%s", dir, out)
			}
		})
	}
}
