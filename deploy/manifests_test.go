package deploy

import (
	"io/fs"
	"os"
	"path"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
)

// TestKustomizationsListed keeps Kustomizations complete: every directory
// users can apply (base, each overlay, the rules, the dashboard) renders in
// the tests below only if it is listed.
func TestKustomizationsListed(t *testing.T) {
	var found []string
	for _, pattern := range []string{"base", "overlays/*", "prometheus-operator", "dashboards"} {
		dirs, err := fs.Glob(Files, pattern)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range dirs {
			if _, err := fs.Stat(Files, path.Join(d, "kustomization.yaml")); err == nil {
				found = append(found, d)
			}
		}
	}
	slices.Sort(found)
	want := slices.Sorted(slices.Values(Kustomizations))
	if !slices.Equal(found, want) {
		t.Errorf("kustomization directories %v, Kustomizations lists %v", found, want)
	}
}

// TestManifestsDecodeStrictly renders every kustomization directory, the
// building blocks (base/server, per-zone/zone-*) included, and decodes each
// object strictly with the Kubernetes scheme.
func TestManifestsDecodeStrictly(t *testing.T) {
	var dirs []string
	err := fs.WalkDir(Files, ".", func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Name() == "kustomization.yaml" {
			dirs = append(dirs, path.Dir(p))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(dirs) < len(Kustomizations) {
		t.Fatalf("found %d kustomizations, fewer than the %d listed", len(dirs), len(Kustomizations))
	}
	for _, dir := range dirs {
		t.Run(dir, func(t *testing.T) {
			objs := objects(t, dir)
			if len(objs) == 0 {
				t.Fatal("renders no objects")
			}
			for _, o := range objs {
				if u, ok := o.(*unstructured.Unstructured); ok && u.GroupVersionKind() != PrometheusRuleGVK {
					t.Errorf("%s %s decoded without a type", u.GetKind(), u.GetName())
				}
			}
		})
	}
}

// TestDecodeIsStrict shows that Decode would catch what the manifests must
// not contain: a misspelt field, a duplicated one, an unknown kind.
func TestDecodeIsStrict(t *testing.T) {
	tests := []struct {
		name, doc string
		wantErr   bool
	}{
		{"valid", "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n", false},
		{"unknown field", "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\nautomountToken: false\n", true},
		{"duplicate field", "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n  name: b\n", true},
		{"wrong type", "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: a\nspec:\n  replicas: two\n", true},
		{"unknown kind", "apiVersion: v1\nkind: Pot\nmetadata:\n  name: a\n", true},
		{"prometheus rule", "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: a\n", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs, err := Decode([]byte("---\n" + tt.doc + "---\n"))
			if (err != nil) != tt.wantErr {
				t.Fatalf("Decode error = %v, want error %v", err, tt.wantErr)
			}
			if err == nil && len(objs) != 1 {
				t.Fatalf("Decode returned %d objects, want 1", len(objs))
			}
		})
	}
}

// TestServerRBAC pins the server's ClusterRole to exactly what it needs.
func TestServerRBAC(t *testing.T) {
	want := map[string][]string{ // "group/resource" -> verbs
		"/pods":                              {"get", "list", "watch"},
		"/nodes":                             {"get", "list", "watch"},
		"/services":                          {"list", "watch"},
		"discovery.k8s.io/endpointslices":    {"list", "watch"},
		"apps/replicasets":                   {"get", "list", "watch"},
		"batch/jobs":                         {"get", "list", "watch"},
		"authentication.k8s.io/tokenreviews": {"create"},
	}
	checkClusterRole(t, "kubezonnet-server", want)
}

// TestAgentRBAC: the agent reads only its own Node, which RBAC can only
// express as get on nodes.
func TestAgentRBAC(t *testing.T) {
	checkClusterRole(t, "kubezonnet-agent", map[string][]string{"/nodes": {"get"}})
}

func checkClusterRole(t *testing.T, name string, want map[string][]string) {
	t.Helper()
	objs := objects(t, "base")
	got := map[string][]string{}
	var role *rbacv1.ClusterRole
	for _, r := range ofType[*rbacv1.ClusterRole](objs) {
		if r.Name == name {
			role = r
		}
	}
	if role == nil {
		t.Fatalf("no ClusterRole %s", name)
	}
	for _, r := range role.Rules {
		if len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
			t.Errorf("rule %v: unexpected resourceNames/nonResourceURLs", r)
		}
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				k := g + "/" + res
				got[k] = append(got[k], r.Verbs...)
			}
		}
	}
	for k, verbs := range got {
		slices.Sort(verbs)
		w := slices.Sorted(slices.Values(want[k]))
		if !slices.Equal(verbs, w) {
			t.Errorf("ClusterRole %s grants %v on %q, want %v", name, verbs, k, w)
		}
	}
	for k := range want {
		if _, ok := got[k]; !ok {
			t.Errorf("ClusterRole %s lacks %q", name, k)
		}
	}
	// The binding ties the role to the ServiceAccount of the same name.
	bound := false
	for _, b := range ofType[*rbacv1.ClusterRoleBinding](objs) {
		if b.RoleRef.Name == name && b.RoleRef.Kind == "ClusterRole" {
			for _, s := range b.Subjects {
				bound = bound || (s.Kind == "ServiceAccount" && s.Name == name && s.Namespace == "kubezonnet")
			}
		}
	}
	if !bound {
		t.Errorf("ClusterRole %s is not bound to ServiceAccount kubezonnet/%s", name, name)
	}
}

// TestAgentDaemonSet checks the agent's privileges and wiring in every
// flavour: netfilter (base) and cgroup mode.
func TestAgentDaemonSet(t *testing.T) {
	tests := []struct {
		dir        string
		attachMode string
		hostMounts []string
	}{
		{"base", "netfilter", nil},
		{"overlays/cgroup", "cgroup", []string{"/sys/fs/cgroup"}},
		{"overlays/per-zone", "netfilter", nil},
	}
	for _, tt := range tests {
		t.Run(tt.dir, func(t *testing.T) {
			ds := ofType[*appsv1.DaemonSet](objects(t, tt.dir))
			if len(ds) != 1 {
				t.Fatalf("%d DaemonSets, want 1", len(ds))
			}
			pod := ds[0].Spec.Template.Spec
			if !pod.HostNetwork || pod.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
				t.Errorf("hostNetwork=%v dnsPolicy=%q, want host network resolving cluster names", pod.HostNetwork, pod.DNSPolicy)
			}
			if pod.ServiceAccountName != "kubezonnet-agent" {
				t.Errorf("serviceAccountName %q", pod.ServiceAccountName)
			}
			tolerateAll := slices.ContainsFunc(pod.Tolerations, func(tol corev1.Toleration) bool {
				return tol.Operator == corev1.TolerationOpExists && tol.Key == "" && tol.Effect == ""
			})
			if !tolerateAll {
				t.Errorf("tolerations %v do not tolerate every taint", pod.Tolerations)
			}
			c := onlyContainer(t, pod)
			sc := c.SecurityContext
			if sc == nil || sc.Capabilities == nil {
				t.Fatal("no securityContext.capabilities")
			}
			if sc.Privileged != nil && *sc.Privileged {
				t.Error("privileged container")
			}
			if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
				t.Errorf("drops %v, want ALL", sc.Capabilities.Drop)
			}
			add := slices.Sorted(slices.Values(sc.Capabilities.Add))
			if want := []corev1.Capability{"BPF", "NET_ADMIN", "PERFMON"}; !slices.Equal(add, want) {
				t.Errorf("adds %v, want %v", add, want)
			}
			checkHardened(t, c)
			checkProbes(t, c, "metrics")
			if arg := flagValue(c.Args, "attach-mode"); arg != tt.attachMode {
				t.Errorf("--attach-mode=%q, want %q", arg, tt.attachMode)
			}
			// Node name from the downward API.
			var nodeEnv *corev1.EnvVar
			for i := range c.Env {
				if c.Env[i].Name == "KUBEZONNET_NODE_NAME" {
					nodeEnv = &c.Env[i]
				}
			}
			if nodeEnv == nil || nodeEnv.ValueFrom == nil || nodeEnv.ValueFrom.FieldRef == nil || nodeEnv.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
				t.Errorf("KUBEZONNET_NODE_NAME is not spec.nodeName from the downward API: %+v", nodeEnv)
			}
			// The token file is a projected ServiceAccount token for the server.
			tokenFile := flagValue(c.Args, "token-file")
			if !projectedToken(pod, c, tokenFile) {
				t.Errorf("--token-file=%s is not a mounted projected ServiceAccount token with an audience", tokenFile)
			}
			// Host paths: exactly the ones this mode needs, mounted read-only.
			var hostPaths []string
			for _, v := range pod.Volumes {
				if v.HostPath != nil {
					hostPaths = append(hostPaths, v.HostPath.Path)
				}
			}
			if !slices.Equal(hostPaths, tt.hostMounts) {
				t.Errorf("hostPath volumes %v, want %v", hostPaths, tt.hostMounts)
			}
			if tt.attachMode == "cgroup" {
				cg := flagValue(c.Args, "cgroup-path")
				if m := mountFor(c, cg); m == nil || !m.ReadOnly {
					t.Errorf("--cgroup-path=%s is not a read-only mount", cg)
				}
			}
			// The agent reaches the server through its Service.
			if u := flagValue(c.Args, "server-url"); !strings.Contains(u, "kubezonnet-server.kubezonnet.svc") {
				t.Errorf("--server-url=%s does not name the server Service", u)
			}
		})
	}
}

// TestServerDeployments checks every server Deployment (one, or one per
// zone): non-root, read-only, probes, config wiring.
func TestServerDeployments(t *testing.T) {
	for _, dir := range []string{"base", "overlays/per-zone", "overlays/mimir", "overlays/thanos", "overlays/prometheus-operator", "overlays/victoriametrics", "overlays/persistent-state"} {
		t.Run(dir, func(t *testing.T) {
			objs := objects(t, dir)
			deps := ofType[*appsv1.Deployment](objs)
			if len(deps) == 0 {
				t.Fatal("no server Deployment")
			}
			for _, d := range deps {
				pod := d.Spec.Template.Spec
				if pod.ServiceAccountName != "kubezonnet-server" {
					t.Errorf("%s: serviceAccountName %q", d.Name, pod.ServiceAccountName)
				}
				c := onlyContainer(t, pod)
				if pod.SecurityContext == nil || pod.SecurityContext.RunAsNonRoot == nil || !*pod.SecurityContext.RunAsNonRoot ||
					pod.SecurityContext.RunAsUser == nil || *pod.SecurityContext.RunAsUser == 0 {
					t.Errorf("%s: not forced to a non-root user", d.Name)
				}
				if c.SecurityContext == nil || c.SecurityContext.Capabilities == nil || len(c.SecurityContext.Capabilities.Add) != 0 ||
					!slices.Equal(c.SecurityContext.Capabilities.Drop, []corev1.Capability{"ALL"}) {
					t.Errorf("%s: capabilities are not dropped entirely", d.Name)
				}
				checkHardened(t, c)
				checkProbes(t, c, "http")
				// The remote-write config file comes from the ConfigMap.
				cfg := flagValue(c.Args, "remote-write-config")
				m := mountFor(c, cfg)
				if m == nil {
					t.Fatalf("%s: --remote-write-config=%s is not mounted", d.Name, cfg)
				}
				var cm *corev1.ConfigMap
				for _, v := range pod.Volumes {
					if v.Name == m.Name && v.ConfigMap != nil {
						for _, o := range ofType[*corev1.ConfigMap](objs) {
							if o.Name == v.ConfigMap.Name {
								cm = o
							}
						}
					}
				}
				if cm == nil {
					t.Fatalf("%s: --remote-write-config=%s is not backed by a rendered ConfigMap", d.Name, cfg)
				}
				if _, ok := cm.Data[path.Base(cfg)]; !ok {
					t.Errorf("%s: ConfigMap %s has no key %s", d.Name, cm.Name, path.Base(cfg))
				}
				if d.Spec.Replicas == nil || *d.Spec.Replicas != 1 {
					t.Errorf("%s: replicas %v, want 1 (retries must reach the server that saw the first attempt)", d.Name, d.Spec.Replicas)
				}
				checkDurable(t, d, objs)
			}
			// Service and PodDisruptionBudget select exactly the server pods.
			var svc *corev1.Service
			for _, s := range ofType[*corev1.Service](objs) {
				if s.Name == "kubezonnet-server" {
					svc = s
				}
			}
			if svc == nil {
				t.Fatal("no Service kubezonnet-server")
			}
			if svc.Spec.TrafficDistribution == nil || *svc.Spec.TrafficDistribution != corev1.ServiceTrafficDistributionPreferClose {
				t.Errorf("Service trafficDistribution %v, want PreferClose", svc.Spec.TrafficDistribution)
			}
			pdbs := ofType[*policyv1.PodDisruptionBudget](objs)
			if len(pdbs) != 1 {
				t.Fatalf("%d PodDisruptionBudgets, want 1", len(pdbs))
			}
			pdbSel, err := metav1LabelSelector(pdbs[0])
			if err != nil {
				t.Fatal(err)
			}
			for _, tmpl := range podTemplates(objs) {
				isServer := tmpl.Spec.ServiceAccountName == "kubezonnet-server"
				l := labels.Set(tmpl.Labels)
				if got := labels.SelectorFromSet(svc.Spec.Selector).Matches(l); got != isServer {
					t.Errorf("Service selects pod %v: %v, want %v", tmpl.Labels, got, isServer)
				}
				if got := pdbSel.Matches(l); got != isServer {
					t.Errorf("PodDisruptionBudget selects pod %v: %v, want %v", tmpl.Labels, got, isServer)
				}
			}
		})
	}
}

// TestPerZoneServers: one server per zone, each pinned to its zone, with
// selectors that do not overlap (overlapping Deployments fight over pods).
func TestPerZoneServers(t *testing.T) {
	deps := ofType[*appsv1.Deployment](objects(t, "overlays/per-zone"))
	if len(deps) != 3 {
		t.Fatalf("%d server Deployments, want 3 (one per zone)", len(deps))
	}
	zones := map[string]bool{}
	for _, d := range deps {
		aff := d.Spec.Template.Spec.Affinity
		if aff == nil || aff.NodeAffinity == nil || aff.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
			t.Fatalf("%s: no required node affinity", d.Name)
		}
		terms := aff.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms
		if len(terms) != 1 || len(terms[0].MatchExpressions) != 1 {
			t.Fatalf("%s: node affinity %v, want one zone term", d.Name, terms)
		}
		e := terms[0].MatchExpressions[0]
		if e.Key != corev1.LabelTopologyZone || e.Operator != corev1.NodeSelectorOpIn || len(e.Values) != 1 {
			t.Fatalf("%s: node affinity %v, want %s In [one zone]", d.Name, e, corev1.LabelTopologyZone)
		}
		zone := e.Values[0]
		if zones[zone] {
			t.Errorf("two servers in zone %s", zone)
		}
		zones[zone] = true
		if !strings.HasSuffix(d.Name, "-"+zone) {
			t.Errorf("Deployment %s is pinned to zone %s", d.Name, zone)
		}
		for _, other := range deps {
			sel, err := metav1LabelSelectorOf(d)
			if err != nil {
				t.Fatal(err)
			}
			if other != d && sel.Matches(labels.Set(other.Spec.Template.Labels)) {
				t.Errorf("the selector of %s matches the pods of %s", d.Name, other.Name)
			}
		}
	}
}

// TestImages: every container runs the image `make image` builds, tagged
// with the release in the file VERSION.
func TestImages(t *testing.T) {
	makefile, err := os.ReadFile("../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	version := releaseVersion(t)
	m := regexp.MustCompile(`(?m)^IMAGE\s*\?=\s*(\S+)`).FindSubmatch(makefile)
	if m == nil {
		t.Fatal("Makefile sets no IMAGE")
	}
	repo := string(m[1])
	for _, dir := range Kustomizations {
		for name, tmpl := range podTemplates(objects(t, dir)) {
			for _, c := range append(tmpl.Spec.InitContainers, tmpl.Spec.Containers...) {
				if want := repo + ":" + version; c.Image != want {
					t.Errorf("%s: %s container %s runs image %q, want %s (the file VERSION)", dir, name, c.Name, c.Image, want)
				}
			}
		}
	}
}

func checkHardened(t *testing.T, c corev1.Container) {
	t.Helper()
	sc := c.SecurityContext
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("container %s: root filesystem is writable", c.Name)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("container %s: allows privilege escalation", c.Name)
	}
	r := c.Resources
	if r.Requests.Cpu().IsZero() || r.Requests.Memory().IsZero() || r.Limits.Memory().IsZero() {
		t.Errorf("container %s: resources %v lack cpu/memory requests or a memory limit", c.Name, r)
	}
}

// checkProbes: liveness on /healthz and readiness on /readyz, both on the
// named port, which is the one --listen-address binds.
func checkProbes(t *testing.T, c corev1.Container, port string) {
	t.Helper()
	for probe, p := range map[string]*corev1.Probe{"/healthz": c.LivenessProbe, "/readyz": c.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != probe || p.HTTPGet.Port.String() != port {
			t.Errorf("container %s: probe %s missing or not on port %s", c.Name, probe, port)
		}
	}
	if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool {
		return p.Name == port && ":"+itoa(p.ContainerPort) == flagValue(c.Args, "listen-address")
	}) {
		t.Errorf("container %s: port %s does not match --listen-address=%s", c.Name, port, flagValue(c.Args, "listen-address"))
	}
}

func onlyContainer(t *testing.T, pod corev1.PodSpec) corev1.Container {
	t.Helper()
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Containers))
	}
	return pod.Containers[0]
}

// flagValue returns the value of --name=value in args ("" if absent).
func flagValue(args []string, name string) string {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v
		}
	}
	return ""
}

// mountFor returns the volume mount holding file (or directory) p.
func mountFor(c corev1.Container, p string) *corev1.VolumeMount {
	if p == "" {
		return nil
	}
	for i, m := range c.VolumeMounts {
		if p == m.MountPath || strings.HasPrefix(p, strings.TrimSuffix(m.MountPath, "/")+"/") {
			return &c.VolumeMounts[i]
		}
	}
	return nil
}

// projectedToken reports whether file is a projected ServiceAccount token
// with an audience, mounted into c.
func projectedToken(pod corev1.PodSpec, c corev1.Container, file string) bool {
	m := mountFor(c, file)
	if m == nil {
		return false
	}
	for _, v := range pod.Volumes {
		if v.Name != m.Name || v.Projected == nil {
			continue
		}
		for _, s := range v.Projected.Sources {
			if s.ServiceAccountToken != nil && s.ServiceAccountToken.Audience != "" &&
				path.Join(m.MountPath, s.ServiceAccountToken.Path) == file {
				return true
			}
		}
	}
	return false
}

// checkDurable: the server keeps its state on a writable volume, and its
// shutdown fits the pod's grace period (the kubelet kills it at the end).
func checkDurable(t *testing.T, d *appsv1.Deployment, objs []runtime.Object) {
	t.Helper()
	pod := d.Spec.Template.Spec
	c := pod.Containers[0]
	dir := flagValue(c.Args, "state-dir")
	if dir == "" {
		t.Errorf("%s: no --state-dir: acknowledged batches die with the process", d.Name)
		return
	}
	m := mountFor(c, dir+"/wal")
	if m == nil || m.ReadOnly {
		t.Errorf("%s: --state-dir=%s is not on a writable volume (the root filesystem is read-only)", d.Name, dir)
		return
	}
	for _, v := range pod.Volumes {
		if v.Name != m.Name {
			continue
		}
		switch {
		case v.EmptyDir != nil:
		case v.PersistentVolumeClaim != nil:
			found := false
			for _, pvc := range ofType[*corev1.PersistentVolumeClaim](objs) {
				found = found || pvc.Name == v.PersistentVolumeClaim.ClaimName
			}
			if !found {
				t.Errorf("%s: state volume claims %q, which is not rendered", d.Name, v.PersistentVolumeClaim.ClaimName)
			}
			if d.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
				t.Errorf("%s: state on a claim needs the Recreate strategy (one writer), got %q", d.Name, d.Spec.Strategy.Type)
			}
		default:
			t.Errorf("%s: state volume %q is neither an emptyDir nor a claim", d.Name, v.Name)
		}
	}
	grace := pod.TerminationGracePeriodSeconds
	if grace == nil {
		t.Errorf("%s: terminationGracePeriodSeconds not set explicitly", d.Name)
		return
	}
	sd, err := time.ParseDuration(flagValue(c.Args, "shutdown-grace-period"))
	if err != nil {
		t.Errorf("%s: --shutdown-grace-period: %v", d.Name, err)
		return
	}
	if sd >= time.Duration(*grace)*time.Second {
		t.Errorf("%s: --shutdown-grace-period=%s does not fit terminationGracePeriodSeconds=%d", d.Name, sd, *grace)
	}
}
