package testenv

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// processesMentioning returns the pids whose command line contains s: the
// control plane's programs all name its directory in their flags.
func processesMentioning(t *testing.T, s string) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatalf("reading /proc: %v", err)
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue // exited meanwhile
		}
		if bytes.Contains(cmdline, []byte(s)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func TestControlPlaneLifecycle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tmp := t.TempDir()
	b := testBinaries(t)
	start := time.Now()
	cp, err := StartControlPlane(ctx, Options{Binaries: b, TempDir: tmp})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("control plane ready in %v", time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() { cp.Stop() })
	if got := processesMentioning(t, cp.Dir); len(got) != 2 {
		t.Errorf("processes naming %s while running: %v, want etcd and kube-apiserver", cp.Dir, got)
	}

	admin, err := cp.AdminClient()
	if err != nil {
		t.Fatal(err)
	}
	v, err := admin.Discovery().ServerVersion()
	if err != nil {
		t.Fatalf("server version: %v", err)
	}
	if v.GitVersion != "v1.37.2" {
		t.Errorf("server version %q, want v1.37.2 (set by build-k8s.sh's -ldflags)", v.GitVersion)
	}

	t.Run("kubeconfig of a service account", func(t *testing.T) {
		if err := cp.EnsureServiceAccount(ctx, "team", "builder"); err != nil {
			t.Fatal(err)
		}
		token, err := cp.ServiceAccountToken(ctx, "team", "builder", nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "kubeconfig")
		if err := cp.WriteKubeconfig(path, token); err != nil {
			t.Fatal(err)
		}
		cfg, err := clientcmd.BuildConfigFromFlags("", path)
		if err != nil {
			t.Fatalf("loading the kubeconfig: %v", err)
		}
		c, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		rev, err := c.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("self subject review through the kubeconfig: %v", err)
		}
		if got, want := rev.Status.UserInfo.Username, "system:serviceaccount:team:builder"; got != want {
			t.Errorf("kubeconfig authenticates as %q, want %q", got, want)
		}
	})

	t.Run("token bound to a pod", func(t *testing.T) {
		if err := cp.EnsureServiceAccount(ctx, "team", "agent"); err != nil {
			t.Fatal(err)
		}
		pod, err := admin.CoreV1().Pods("team").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "agent-x"},
			Spec: corev1.PodSpec{ServiceAccountName: "agent", NodeName: "nowhere",
				Containers: []corev1.Container{{Name: "main", Image: "registry.invalid/x"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		token, err := cp.ServiceAccountToken(ctx, "team", "agent", []string{"kubezonnet"}, pod)
		if err != nil {
			t.Fatal(err)
		}
		review := func() *authenticationv1.TokenReview {
			r, err := admin.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
				Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: []string{"kubezonnet"}},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Fatalf("token review: %v", err)
			}
			return r
		}
		r := review()
		if !r.Status.Authenticated || r.Status.User.Username != "system:serviceaccount:team:agent" {
			t.Fatalf("bound token review: authenticated=%v user=%q error=%q", r.Status.Authenticated, r.Status.User.Username, r.Status.Error)
		}
		if got := r.Status.User.Extra["authentication.kubernetes.io/pod-name"]; len(got) != 1 || got[0] != "agent-x" {
			t.Errorf("bound token's pod name %v, want [agent-x]", got)
		}
		// A deleted pod's token keeps authenticating for the API server's
		// 10 s token cache; not worth the wait here.
	})

	pids := cp.Pids()
	if err := cp.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	for _, pid := range pids {
		if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("process %d still in /proc after Stop (stat: %v)", pid, err)
		}
	}
	if got := processesMentioning(t, cp.Dir); len(got) != 0 {
		t.Errorf("processes naming %s after Stop: %v", cp.Dir, got)
	}
	if _, err := os.Stat(cp.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s still there after Stop (stat: %v)", cp.Dir, err)
	}
	if err := cp.Stop(); err != nil {
		t.Errorf("second stop: %v", err)
	}
}

// A control plane that cannot start leaves no process and no directory,
// and says why.
func TestControlPlaneStartFailureCleansUp(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tmp := t.TempDir()
	cp, err := StartControlPlane(ctx, Options{
		Binaries: testBinaries(t), TempDir: tmp,
		ExtraAPIServerArgs: []string{"--no-such-flag=1"},
	})
	if err == nil {
		cp.Stop()
		t.Fatal("StartControlPlane with an unknown kube-apiserver flag succeeded")
	}
	if !strings.Contains(err.Error(), "no-such-flag") {
		t.Errorf("error does not show kube-apiserver's complaint: %v", err)
	}
	entries, _ := os.ReadDir(tmp)
	if len(entries) != 0 {
		t.Errorf("left behind in the temp dir: %v", entries)
	}
	if got := processesMentioning(t, tmp); len(got) != 0 {
		t.Errorf("processes naming %s after a failed start: %v", tmp, got)
	}
}
