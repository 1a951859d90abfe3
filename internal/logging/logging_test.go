package logging

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"k8s.io/klog/v2"
)

// After RouteKlog, what client-go logs through klog comes out as JSON
// lines of the injected logger, marked as client-go's.
func TestRouteKlog(t *testing.T) {
	var buf bytes.Buffer
	log, err := New(&buf, "json", "info")
	if err != nil {
		t.Fatal(err)
	}
	RouteKlog(log)
	t.Cleanup(func() { klog.ClearLogger() })
	klog.Warningf("failed to list *v1.Pod: %s", "connection refused")
	klog.Flush()
	line := strings.TrimSpace(buf.String())
	var rec map[string]any
	if err := json.Unmarshal([]byte(line), &rec); err != nil {
		t.Fatalf("klog output is not a JSON line of the logger: %q (%v)", line, err)
	}
	if rec["component"] != "client-go" || !strings.Contains(rec["msg"].(string), "connection refused") {
		t.Errorf("record %v: want component client-go and the message", rec)
	}
}
