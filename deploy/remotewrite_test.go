package deploy

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
)

// remoteWriteFlagNames are the flags internal/remotewrite adds to the
// server command.
func remoteWriteFlagNames() map[string]bool {
	names := map[string]bool{}
	for _, f := range remotewrite.Flags() {
		for _, n := range f.Names() {
			names[n] = true
		}
	}
	return names
}

// TestRemoteWriteSettings feeds every server container's remote-write
// flags, with the ConfigMap's file in place of the mounted one, to the real
// remotewrite.ConfigFromCLI: each overlay's endpoints, headers, HA labels
// and external labels pass the validation the server applies at start.
func TestRemoteWriteSettings(t *testing.T) {
	rwFlags := remoteWriteFlagNames()
	for _, dir := range Kustomizations {
		objs := objects(t, dir)
		for _, d := range ofType[*appsv1.Deployment](objs) {
			t.Run(dir+"/"+d.Name, func(t *testing.T) {
				c := onlyContainer(t, d.Spec.Template.Spec)
				args := []string{"server"}
				for _, a := range c.Args[1:] {
					name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
					if !rwFlags[name] {
						continue
					}
					a = expandEnv(t, c, a)
					if cfgPath, ok := strings.CutPrefix(a, "--remote-write-config="); ok {
						a = "--remote-write-config=" + configMapFile(t, objs, d.Spec.Template.Spec, c, cfgPath)
					}
					args = append(args, a)
				}
				cfg, err := remoteWriteConfig(args)
				if err != nil {
					t.Fatalf("remote-write settings %v: %v", args[1:], err)
				}
				if len(cfg.Endpoints) == 0 {
					t.Errorf("remote-write settings %v name no endpoint", args[1:])
				}
			})
		}
	}
}

// TestRemoteWriteSettingsCanFail shows that the check above rejects what
// a manifest could get wrong.
func TestRemoteWriteSettingsCanFail(t *testing.T) {
	dir := t.TempDir()
	for name, tc := range map[string]struct {
		file string
		args []string
	}{
		"Prometheus' remote_write key": {file: "remote_write:\n  - url: http://p:9090/api/v1/write\n"},
		"url without scheme":           {file: "endpoints:\n  - url: p:9090/api/v1/write\n"},
		"reserved external label":      {file: "endpoints:\n  - url: http://p:9090/api/v1/write\n", args: []string{"--external-label=__replica__=x"}},
		"HA cluster without replica":   {file: "endpoints:\n  - url: http://p:9090/api/v1/write\n", args: []string{"--remote-write-ha-cluster=c"}},
	} {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(dir, "rw.yaml")
			if err := os.WriteFile(p, []byte(tc.file), 0o644); err != nil {
				t.Fatal(err)
			}
			if _, err := remoteWriteConfig(append([]string{"server", "--remote-write-config=" + p}, tc.args...)); err == nil {
				t.Error("accepted")
			}
		})
	}
}

// remoteWriteConfig parses args with the remote-write flags alone and
// returns remotewrite.ConfigFromCLI's result.
func remoteWriteConfig(args []string) (remotewrite.PusherConfig, error) {
	var cfg remotewrite.PusherConfig
	var cfgErr error
	app := &cli.App{
		Name:   "server",
		Flags:  remotewrite.Flags(),
		Writer: ioDiscard{}, ErrWriter: ioDiscard{},
		Action: func(c *cli.Context) error {
			cfg, cfgErr = remotewrite.ConfigFromCLI(c)
			return nil
		},
	}
	if err := app.Run(args); err != nil {
		return cfg, err
	}
	return cfg, cfgErr
}

type ioDiscard struct{}

func (ioDiscard) Write(p []byte) (int, error) { return len(p), nil }

// dependentVar matches Kubernetes' $(VAR) references in args.
var dependentVar = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// expandEnv expands $(VAR) as the kubelet does, failing for a variable the
// container does not define (the kubelet would pass it on literally).
func expandEnv(t *testing.T, c corev1.Container, arg string) string {
	t.Helper()
	return dependentVar.ReplaceAllStringFunc(arg, func(ref string) string {
		name := dependentVar.FindStringSubmatch(ref)[1]
		for _, e := range c.Env {
			if e.Name != name {
				continue
			}
			if e.ValueFrom != nil {
				return "from-" + strings.ToLower(name) // a downward-API value
			}
			return e.Value
		}
		t.Errorf("argument %q refers to $(%s), which container %s does not define", arg, name, c.Name)
		return ref
	})
}

// configMapFile writes the ConfigMap key that backs the mounted file p to
// a temporary file and returns its path.
func configMapFile(t *testing.T, objs []runtime.Object, pod corev1.PodSpec, c corev1.Container, p string) string {
	t.Helper()
	m := mountFor(c, p)
	if m == nil {
		t.Fatalf("%s is not mounted", p)
	}
	for _, v := range pod.Volumes {
		if v.Name != m.Name || v.ConfigMap == nil {
			continue
		}
		for _, cm := range ofType[*corev1.ConfigMap](objs) {
			if cm.Name != v.ConfigMap.Name {
				continue
			}
			data, ok := cm.Data[strings.TrimPrefix(p, strings.TrimSuffix(m.MountPath, "/")+"/")]
			if !ok {
				t.Fatalf("ConfigMap %s has no key for %s", cm.Name, p)
			}
			out := filepath.Join(t.TempDir(), filepath.Base(p))
			if err := os.WriteFile(out, []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
			return out
		}
	}
	t.Fatalf("%s is not backed by a rendered ConfigMap", p)
	return ""
}
