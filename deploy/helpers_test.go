package deploy

import (
	"strconv"

	"context"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// rendered caches Render per directory: kubectl kustomize is the slow part
// of these tests and its output does not change within a run.
var rendered sync.Map // dir -> renderResult

type renderResult struct {
	objs []runtime.Object
	err  error
}

// objects renders dir and decodes it strictly, failing the test on error.
func objects(t *testing.T, dir string) []runtime.Object {
	t.Helper()
	requireTool(t, Kubectl(), "kubectl (it embeds kustomize; 1.32 is what the tests ran with)")
	if r, ok := rendered.Load(dir); ok {
		res := r.(renderResult)
		if res.err != nil {
			t.Fatal(res.err)
		}
		return res.objs
	}
	var res renderResult
	b, err := Render(context.Background(), dir)
	if err == nil {
		res.objs, err = Decode(b)
	}
	res.err = err
	rendered.Store(dir, res)
	if err != nil {
		t.Fatal(err)
	}
	return res.objs
}

// ofType returns the objects of type T among objs.
func ofType[T runtime.Object](objs []runtime.Object) []T {
	var out []T
	for _, o := range objs {
		if v, ok := o.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

// podTemplates returns every pod template (Deployments and DaemonSets)
// with the name of its owner.
func podTemplates(objs []runtime.Object) map[string]corev1.PodTemplateSpec {
	out := map[string]corev1.PodTemplateSpec{}
	for _, d := range ofType[*appsv1.Deployment](objs) {
		out["Deployment/"+d.Name] = d.Spec.Template
	}
	for _, d := range ofType[*appsv1.DaemonSet](objs) {
		out["DaemonSet/"+d.Name] = d.Spec.Template
	}
	return out
}

func itoa(i int32) string { return strconv.Itoa(int(i)) }

func metav1LabelSelector(p *policyv1.PodDisruptionBudget) (labels.Selector, error) {
	return metav1.LabelSelectorAsSelector(p.Spec.Selector)
}

func metav1LabelSelectorOf(d *appsv1.Deployment) (labels.Selector, error) {
	return metav1.LabelSelectorAsSelector(d.Spec.Selector)
}
