package remotewrite

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
)

func TestPusherConfigValidate(t *testing.T) {
	ok := func() PusherConfig {
		c := DefaultPusherConfig()
		c.Endpoints = []EndpointConfig{{URL: "http://prometheus:9090/api/v1/write"}}
		return c
	}
	for _, tc := range []struct {
		name   string
		mutate func(*PusherConfig)
		want   string // substring of the error; "" for valid
	}{
		{"defaults", func(*PusherConfig) {}, ""},
		{"no endpoints is valid (scrape only)", func(c *PusherConfig) { c.Endpoints = nil }, ""},
		{"interval", func(c *PusherConfig) { c.Interval = 0 }, "--push-interval: must be positive, got 0s"},
		{"max series", func(c *PusherConfig) { c.MaxSeriesPerRequest = -1 }, "--remote-write-max-series-per-request: must be positive, got -1"},
		{"shards", func(c *PusherConfig) { c.Shards = 0 }, "--remote-write-shards: must be between 1 and 256, got 0"},
		{"backoff order", func(c *PusherConfig) { c.MaxBackoff = time.Millisecond }, "--remote-write-max-backoff: 1ms is below"},
		{"external label name", func(c *PusherConfig) { c.ExternalLabels = []metrics.Label{{Name: "1x", Value: "v"}} }, `invalid label name "1x"`},
		{"external label reserved", func(c *PusherConfig) { c.ExternalLabels = []metrics.Label{{Name: "__name__", Value: "v"}} }, `invalid label name "__name__"`},
		{"external label empty", func(c *PusherConfig) { c.ExternalLabels = []metrics.Label{{Name: "cluster"}} }, `label "cluster" has an empty value`},
		{"external label twice", func(c *PusherConfig) {
			c.ExternalLabels = []metrics.Label{{Name: "a", Value: "1"}, {Name: "a", Value: "2"}}
		}, `label "a" given twice`},
		{"ha half set", func(c *PusherConfig) { c.HA.Cluster = "prod" }, `--remote-write-ha-cluster "prod" and --remote-write-ha-replica "": set both`},
		{"url scheme", func(c *PusherConfig) { c.Endpoints[0].URL = "ftp://x/y" }, `url "ftp://x/y": scheme must be http or https`},
		{"url no host", func(c *PusherConfig) { c.Endpoints[0].URL = "http:///write" }, `no host`},
		{"url credentials", func(c *PusherConfig) { c.Endpoints[0].URL = "http://u:secret@x/y" }, `credentials in the URL`},
		{"auth both", func(c *PusherConfig) {
			c.Endpoints[0].BasicAuth = &BasicAuth{Username: "u", PasswordFile: "/p"}
			c.Endpoints[0].BearerTokenFile = "/t"
		}, "mutually exclusive"},
		{"basic auth without password", func(c *PusherConfig) { c.Endpoints[0].BasicAuth = &BasicAuth{Username: "u"} }, `password_file ""`},
		{"cert without key", func(c *PusherConfig) { c.Endpoints[0].TLS.CertFile = "/c" }, `cert_file "/c" and key_file ""`},
		{"reserved header", func(c *PusherConfig) { c.Endpoints[0].Headers = map[string]string{"content-type": "x"} }, `header "content-type" is set by kubezonnet`},
		{"bad header", func(c *PusherConfig) { c.Endpoints[0].Headers = map[string]string{"X Bad": "x"} }, `invalid header name "X Bad"`},
		{"negative timeout", func(c *PusherConfig) { c.Endpoints[0].Timeout = -time.Second }, "timeout must be positive, got -1s"},
		{"duplicate names", func(c *PusherConfig) { c.Endpoints = append(c.Endpoints, c.Endpoints[0]) }, `name "prometheus:9090/api/v1/write" already used by endpoint 0`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ok()
			tc.mutate(&c)
			err := c.Validate()
			if tc.want == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestValidateFillsEndpointDefaults(t *testing.T) {
	c := DefaultPusherConfig()
	c.Endpoints = []EndpointConfig{{URL: "https://mimir.example/api/v1/push/"}}
	c.ExternalLabels = []metrics.Label{{Name: "zz", Value: "1"}, {Name: "aa", Value: "2"}}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if e := c.Endpoints[0]; e.Name != "mimir.example/api/v1/push" || e.Timeout != DefaultTimeout {
		t.Errorf("defaults not filled: name %q timeout %v", e.Name, e.Timeout)
	}
	if c.ExternalLabels[0].Name != "aa" {
		t.Errorf("external labels not sorted: %v", c.ExternalLabels)
	}
	if c.HA.ClusterLabel != "cluster" || c.HA.ReplicaLabel != "__replica__" {
		t.Errorf("HA label names %q %q", c.HA.ClusterLabel, c.HA.ReplicaLabel)
	}
}

func TestLoadFileConfig(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	writeFile(t, good, []byte(`
endpoints:
  - url: https://mimir.example/api/v1/push
    name: mimir
    timeout: 10s
    basic_auth: {username: kz, password_file: /secrets/pw}
    tls: {ca_file: /secrets/ca.crt, insecure_skip_verify: false}
    headers: {X-Scope-OrgID: platform}
  - url: http://vm:8428/api/v1/write
    bearer_token_file: /secrets/token
external_labels: {cluster: prod-eu}
ha: {cluster: prod-eu, replica: kubezonnet-0}
`))
	fc, err := LoadFileConfig(good)
	if err != nil {
		t.Fatal(err)
	}
	if len(fc.Endpoints) != 2 {
		t.Fatalf("%d endpoints", len(fc.Endpoints))
	}
	m := fc.Endpoints[0]
	if m.Name != "mimir" || m.Timeout != 10*time.Second || m.BasicAuth == nil || m.BasicAuth.PasswordFile != "/secrets/pw" ||
		m.TLS.CAFile != "/secrets/ca.crt" || m.Headers["X-Scope-OrgID"] != "platform" {
		t.Errorf("first endpoint decoded as %+v", m)
	}
	if fc.Endpoints[1].BearerTokenFile != "/secrets/token" || fc.ExternalLabels["cluster"] != "prod-eu" || fc.HA.Replica != "kubezonnet-0" {
		t.Errorf("decoded %+v", fc)
	}

	for name, body := range map[string]string{
		"typo.yaml":     "endpoints:\n  - url: http://x/y\n    bearer_token_flie: /t\n",
		"duration.yaml": "endpoints:\n  - url: http://x/y\n    timeout: soon\n",
	} {
		p := filepath.Join(dir, name)
		writeFile(t, p, []byte(body))
		if _, err := LoadFileConfig(p); err == nil || !strings.Contains(err.Error(), p) {
			t.Errorf("%s: error %v, want one naming the file", name, err)
		}
	}
	if _, err := LoadFileConfig(filepath.Join(dir, "absent.yaml")); err == nil || !strings.Contains(err.Error(), "--remote-write-config") {
		t.Errorf("missing file: %v", err)
	}
	empty := filepath.Join(dir, "empty.yaml")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadFileConfig(empty); err != nil {
		t.Errorf("empty file: %v", err)
	}
}
