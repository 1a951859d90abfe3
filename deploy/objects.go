package deploy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"
)

// PrometheusRuleGVK is the one kind we ship that is not in the Kubernetes
// scheme (it comes with the Prometheus Operator's CRD). Decode returns it
// as *unstructured.Unstructured; its content is checked against the plain
// rules file instead (see PrometheusRule).
var PrometheusRuleGVK = schema.GroupVersionKind{Group: "monitoring.coreos.com", Version: "v1", Kind: "PrometheusRule"}

// Decode splits rendered multi-document YAML and decodes every object
// strictly with the client-go scheme: an unknown or duplicated field, a
// wrongly typed value or an unknown kind is an error, exactly what the API
// server would reject (or, worse, silently drop). Only PrometheusRule,
// whose type client-go does not know, comes back unstructured.
func Decode(rendered []byte) ([]runtime.Object, error) {
	strict := json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme.Scheme, scheme.Scheme,
		json.SerializerOptions{Yaml: true, Strict: true})
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(rendered)))
	var objs []runtime.Object
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("reading document %d: %w", i, err)
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		var meta unstructured.Unstructured
		if err := yaml.Unmarshal(doc, &meta.Object); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if meta.GroupVersionKind() == PrometheusRuleGVK {
			objs = append(objs, &meta)
			continue
		}
		obj, _, err := strict.Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("document %d (%s %s): %w", i, meta.GetKind(), meta.GetName(), err)
		}
		objs = append(objs, obj)
	}
}
