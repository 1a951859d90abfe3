package testenv

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

func clientFromKubeconfig(t *testing.T, path string) *kubernetes.Clientset {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		t.Fatalf("loading %s: %v", path, err)
	}
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Issue 6, acceptance 6: the server's ServiceAccount, bound to the
// ClusterRole in deploy/, can do what the server does (list and watch pods,
// nodes, services, endpointslices, replicasets and jobs; create
// tokenreviews) and cannot read
// Secrets. Both the authorizer's answer (SelfSubjectAccessReview) and real
// requests are checked, through the kubeconfig the server is given.
func TestServerServiceAccountPermissions(t *testing.T) {
	env := sharedEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := clientFromKubeconfig(t, env.ServerKubeconfig)

	me, err := c.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := me.Status.UserInfo.Username, "system:serviceaccount:"+Namespace+":"+ServerServiceAccount; got != want {
		t.Fatalf("server kubeconfig authenticates as %q, want %q", got, want)
	}

	access := []struct {
		verb, group, resource, namespace string
		allowed                          bool
	}{
		{"list", "", "pods", "", true},
		{"watch", "", "pods", "", true},
		{"get", "", "pods", "shop", true},
		{"list", "", "nodes", "", true},
		{"watch", "", "nodes", "", true},
		{"list", "", "services", "", true},
		{"watch", "", "services", "", true},
		{"list", "discovery.k8s.io", "endpointslices", "", true},
		{"watch", "discovery.k8s.io", "endpointslices", "", true},
		{"update", "", "services", "shop", false},
		{"delete", "discovery.k8s.io", "endpointslices", "shop", false},
		{"list", "apps", "replicasets", "", true},
		{"watch", "apps", "replicasets", "", true},
		{"list", "batch", "jobs", "", true},
		{"watch", "batch", "jobs", "", true},
		{"create", "authentication.k8s.io", "tokenreviews", "", true},
		{"get", "", "secrets", "", false},
		{"list", "", "secrets", "", false},
		{"watch", "", "secrets", "", false},
		{"get", "", "secrets", Namespace, false},
		{"list", "", "configmaps", "", false},
		{"create", "", "pods", "shop", false},
		{"delete", "", "pods", "shop", false},
		{"update", "", "nodes", "", false},
		{"create", "", "serviceaccounts/token", Namespace, false},
	}
	for _, a := range access {
		r, err := c.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, &authorizationv1.SelfSubjectAccessReview{
			Spec: authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authorizationv1.ResourceAttributes{
				Verb: a.verb, Group: a.group, Resource: resourceOnly(a.resource), Subresource: subresource(a.resource), Namespace: a.namespace,
			}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("access review %s %s: %v", a.verb, a.resource, err)
		}
		if r.Status.Allowed != a.allowed {
			t.Errorf("%s %s.%s in %q: allowed=%v, want %v (%s)", a.verb, a.resource, a.group, a.namespace, r.Status.Allowed, a.allowed, r.Status.Reason)
		}
	}

	// Real requests.
	pods, err := c.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Errorf("list pods: %v", err)
	} else if len(pods.Items) == 0 {
		t.Error("list pods returned none; the cluster has pods")
	}
	if _, err := c.CoreV1().Nodes().List(ctx, metav1.ListOptions{}); err != nil {
		t.Errorf("list nodes: %v", err)
	}
	if _, err := c.AppsV1().ReplicaSets("").List(ctx, metav1.ListOptions{}); err != nil {
		t.Errorf("list replicasets: %v", err)
	}
	if _, err := c.BatchV1().Jobs("").List(ctx, metav1.ListOptions{}); err != nil {
		t.Errorf("list jobs: %v", err)
	}
	if _, err := c.CoreV1().Services("").List(ctx, metav1.ListOptions{}); err != nil {
		t.Errorf("list services: %v", err)
	}
	if _, err := c.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{}); err != nil {
		t.Errorf("list endpointslices: %v", err)
	}
	w, err := c.CoreV1().Pods("").Watch(ctx, metav1.ListOptions{ResourceVersion: pods.ResourceVersion})
	if err != nil {
		t.Errorf("watch pods: %v", err)
	} else {
		w.Stop()
	}
	agentToken, err := env.ControlPlane.ServiceAccountToken(ctx, Namespace, AgentServiceAccount, []string{"kubezonnet"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tr, err := c.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: agentToken, Audiences: []string{"kubezonnet"}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Errorf("create tokenreview: %v", err)
	} else if !tr.Status.Authenticated {
		t.Errorf("the server's token review of an agent token: not authenticated: %s", tr.Status.Error)
	}
	for name, call := range map[string]func() error{
		"list secrets":       func() error { _, err := c.CoreV1().Secrets("").List(ctx, metav1.ListOptions{}); return err },
		"list secrets in ns": func() error { _, err := c.CoreV1().Secrets(Namespace).List(ctx, metav1.ListOptions{}); return err },
		"get secret": func() error {
			_, err := c.CoreV1().Secrets(Namespace).Get(ctx, "anything", metav1.GetOptions{})
			return err
		},
		"delete pod": func() error {
			return c.CoreV1().Pods("shop").DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
		},
		"list configmaps":       func() error { _, err := c.CoreV1().ConfigMaps("").List(ctx, metav1.ListOptions{}); return err },
		"list service accounts": func() error { _, err := c.CoreV1().ServiceAccounts("").List(ctx, metav1.ListOptions{}); return err },
	} {
		if err := call(); !apierrors.IsForbidden(err) {
			t.Errorf("%s: got %v, want 403 Forbidden", name, err)
		}
	}
}

// The kubeconfig files are what other clients read too: kubectl (1.32,
// a different client version) agrees on the server's permissions.
func TestServerKubeconfigWithKubectl(t *testing.T) {
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		t.Skip("kubectl is not installed; the client-go checks above cover the permissions")
	}
	env := sharedEnv(t)
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"auth", "can-i", "list", "pods", "--all-namespaces"}, "yes"},
		{[]string{"auth", "can-i", "watch", "replicasets.apps", "--all-namespaces"}, "yes"},
		{[]string{"auth", "can-i", "get", "secrets", "-n", Namespace}, "no"},
	}
	for _, tt := range tests {
		cmd := exec.Command(kubectl, append([]string{"--kubeconfig", env.ServerKubeconfig}, tt.args...)...)
		cmd.Env = append(os.Environ(), "KUBECTL_SKIP_VERSION_CHECK=1")
		// can-i exits 1 for "no"; its answer is on stdout.
		out, _ := cmd.Output()
		if got := strings.TrimSpace(string(out)); got != tt.want {
			t.Errorf("kubectl %s: %q, want %q", strings.Join(tt.args, " "), got, tt.want)
		}
	}
}

func resourceOnly(r string) string {
	res, _, _ := strings.Cut(r, "/")
	return res
}

func subresource(r string) string {
	_, sub, _ := strings.Cut(r, "/")
	return sub
}

// The chain the server's --auth-mode=tokenreview relies on: an agent's
// token, reviewed with the server's own credentials for the agents'
// audience, names the agents' ServiceAccount and the agent's node.
func TestAgentTokenNamesNode(t *testing.T) {
	env := sharedEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := clientFromKubeconfig(t, env.ServerKubeconfig)
	for _, n := range env.Cluster.Spec.Nodes {
		token, err := env.AgentToken(ctx, n.Name)
		if err != nil {
			t.Fatal(err)
		}
		tr, err := c.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: []string{AgentTokenAudience}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("token review: %v", err)
		}
		if !tr.Status.Authenticated {
			t.Fatalf("agent token of %s not authenticated: %s", n.Name, tr.Status.Error)
		}
		if got, want := tr.Status.User.Username, "system:serviceaccount:"+Namespace+":"+AgentServiceAccount; got != want {
			t.Errorf("agent token of %s authenticates %q, want %q", n.Name, got, want)
		}
		if got := tr.Status.User.Extra["authentication.kubernetes.io/node-name"]; len(got) != 1 || got[0] != n.Name {
			t.Errorf("agent token of %s names node %v", n.Name, got)
		}
	}
}
