package remotewrite

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"go.yaml.in/yaml/v3"
)

// Defaults, each chosen for a server pushing every live series of a
// cluster every interval.
const (
	// DefaultPushInterval matches the default scrape interval of most
	// Prometheus setups, so pushed series look like scraped ones.
	DefaultPushInterval = 15 * time.Second
	// DefaultTimeout bounds one HTTP attempt; Prometheus uses 30s too.
	DefaultTimeout = 30 * time.Second
	// DefaultMaxSeriesPerRequest is Prometheus' max_samples_per_send: small
	// enough for every receiver's default body limit, large enough that a
	// 100,000-series push is only 50 requests.
	DefaultMaxSeriesPerRequest = 2000
	// DefaultShards is the number of concurrent requests per endpoint; a
	// push of one snapshot needs few, unlike Prometheus' streaming queue.
	DefaultShards = 4
	// DefaultMinBackoff and DefaultMaxBackoff are Prometheus' defaults.
	DefaultMinBackoff = 30 * time.Millisecond
	DefaultMaxBackoff = 5 * time.Second
	// DefaultHAClusterLabel and DefaultHAReplicaLabel are the label names
	// Mimir's and Cortex' HA tracker look for.
	DefaultHAClusterLabel = "cluster"
	DefaultHAReplicaLabel = "__replica__"
)

// BasicAuth is HTTP basic authentication; the password is read from a file
// so it never appears on a command line or in a config map.
type BasicAuth struct {
	Username     string `yaml:"username"`
	PasswordFile string `yaml:"password_file"`
}

// TLSConfig is the client side of TLS towards one endpoint.
type TLSConfig struct {
	CAFile             string `yaml:"ca_file"`
	CertFile           string `yaml:"cert_file"`
	KeyFile            string `yaml:"key_file"`
	InsecureSkipVerify bool   `yaml:"insecure_skip_verify"`
}

// EndpointConfig is one remote-write receiver.
type EndpointConfig struct {
	// Name is the value of the endpoint label of the self-metrics; it
	// defaults to the URL's host and path.
	Name    string        `yaml:"name"`
	URL     string        `yaml:"url"`
	Timeout time.Duration `yaml:"timeout"`
	// BasicAuth and BearerTokenFile are mutually exclusive.
	BasicAuth       *BasicAuth `yaml:"basic_auth"`
	BearerTokenFile string     `yaml:"bearer_token_file"`
	TLS             TLSConfig  `yaml:"tls"`
	// Headers are sent with every request, e.g. X-Scope-OrgID for a Mimir
	// or Cortex tenant.
	Headers map[string]string `yaml:"headers"`
}

// HAConfig names this replica for Mimir's and Cortex' HA tracker, which
// accepts samples from one replica of a cluster at a time and needs both
// labels, identical, on every series of every request.
type HAConfig struct {
	Cluster      string `yaml:"cluster"`
	Replica      string `yaml:"replica"`
	ClusterLabel string `yaml:"cluster_label"`
	ReplicaLabel string `yaml:"replica_label"`
}

// PusherConfig is everything the pusher needs; build it with ConfigFromCLI
// or by hand, and check it with Validate (NewPusher does).
type PusherConfig struct {
	Endpoints []EndpointConfig
	// Interval between two snapshots.
	Interval time.Duration
	// ExternalLabels are added to every series unless the series already
	// has a label of that name (Prometheus' rule).
	ExternalLabels []metrics.Label
	// HA, when Cluster is set, adds the HA labels to every series,
	// overriding a series label of the same name.
	HA HAConfig
	// RetryOn429 retries 429 responses honouring Retry-After. Cortex and
	// Mimir answer 429 for per-tenant limits that retrying will not fix,
	// which is why Prometheus lets users turn it off.
	RetryOn429          bool
	MaxSeriesPerRequest int
	Shards              int
	// MinBackoff and MaxBackoff bound the exponential backoff between
	// retries of one endpoint.
	MinBackoff, MaxBackoff time.Duration
}

// DefaultPusherConfig returns a configuration with every default set and
// no endpoint.
func DefaultPusherConfig() PusherConfig {
	return PusherConfig{
		Interval:            DefaultPushInterval,
		RetryOn429:          true,
		MaxSeriesPerRequest: DefaultMaxSeriesPerRequest,
		Shards:              DefaultShards,
		MinBackoff:          DefaultMinBackoff,
		MaxBackoff:          DefaultMaxBackoff,
	}
}

// Enabled reports whether there is anywhere to push to; the server runs
// without endpoints only when --keep-only asks for it.
func (c PusherConfig) Enabled() bool { return len(c.Endpoints) > 0 }

var labelNameRE = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)

// reservedHeaders are set by the client itself; letting users override
// them would break the protocol or the authentication settings.
var reservedHeaders = []string{
	"Authorization", "Content-Encoding", "Content-Length", "Content-Type",
	"Host", "User-Agent", HeaderVersion,
}

// Validate checks every field and fills in endpoint defaults (name,
// timeout). Errors name the flag or config field and the bad value.
func (c *PusherConfig) Validate() error {
	var errs []error
	if c.Interval <= 0 {
		errs = append(errs, fmt.Errorf("--push-interval: must be positive, got %v", c.Interval))
	}
	if c.MaxSeriesPerRequest <= 0 {
		errs = append(errs, fmt.Errorf("--remote-write-max-series-per-request: must be positive, got %d", c.MaxSeriesPerRequest))
	}
	if c.Shards <= 0 || c.Shards > 256 {
		errs = append(errs, fmt.Errorf("--remote-write-shards: must be between 1 and 256, got %d", c.Shards))
	}
	if c.MinBackoff <= 0 {
		errs = append(errs, fmt.Errorf("--remote-write-min-backoff: must be positive, got %v", c.MinBackoff))
	}
	if c.MaxBackoff < c.MinBackoff {
		errs = append(errs, fmt.Errorf("--remote-write-max-backoff: %v is below --remote-write-min-backoff %v", c.MaxBackoff, c.MinBackoff))
	}
	seen := map[string]bool{}
	for _, l := range c.ExternalLabels {
		switch {
		case !labelNameRE.MatchString(l.Name) || strings.HasPrefix(l.Name, "__"):
			errs = append(errs, fmt.Errorf("--external-label: invalid label name %q (want [a-zA-Z_][a-zA-Z0-9_]*, not starting with __)", l.Name))
		case l.Value == "":
			errs = append(errs, fmt.Errorf("--external-label: label %q has an empty value", l.Name))
		case seen[l.Name]:
			errs = append(errs, fmt.Errorf("--external-label: label %q given twice", l.Name))
		}
		seen[l.Name] = true
	}
	slices.SortFunc(c.ExternalLabels, func(a, b metrics.Label) int { return strings.Compare(a.Name, b.Name) })
	errs = append(errs, c.HA.validate()...)
	names := map[string]int{}
	for i := range c.Endpoints {
		e := &c.Endpoints[i]
		if err := e.validate(); err != nil {
			errs = append(errs, fmt.Errorf("remote-write endpoint %d: %w", i, err))
			continue
		}
		if j, dup := names[e.Name]; dup {
			errs = append(errs, fmt.Errorf("remote-write endpoint %d: name %q already used by endpoint %d; give each endpoint its own name", i, e.Name, j))
		}
		names[e.Name] = i
	}
	return errors.Join(errs...)
}

func (h *HAConfig) validate() []error {
	if h.ClusterLabel == "" {
		h.ClusterLabel = DefaultHAClusterLabel
	}
	if h.ReplicaLabel == "" {
		h.ReplicaLabel = DefaultHAReplicaLabel
	}
	var errs []error
	if (h.Cluster == "") != (h.Replica == "") {
		errs = append(errs, fmt.Errorf("--remote-write-ha-cluster %q and --remote-write-ha-replica %q: set both or neither", h.Cluster, h.Replica))
	}
	for _, n := range []string{h.ClusterLabel, h.ReplicaLabel} {
		if !labelNameRE.MatchString(n) || n == "__name__" {
			errs = append(errs, fmt.Errorf("ha: invalid label name %q", n))
		}
	}
	if h.ClusterLabel == h.ReplicaLabel {
		errs = append(errs, fmt.Errorf("ha: cluster_label and replica_label are both %q", h.ClusterLabel))
	}
	return errs
}

// labels returns the HA labels sorted by name, or nil when HA is off.
func (h HAConfig) labels() []metrics.Label {
	if h.Cluster == "" {
		return nil
	}
	ls := []metrics.Label{{Name: h.ClusterLabel, Value: h.Cluster}, {Name: h.ReplicaLabel, Value: h.Replica}}
	slices.SortFunc(ls, func(a, b metrics.Label) int { return strings.Compare(a.Name, b.Name) })
	return ls
}

func (e *EndpointConfig) validate() error {
	u, err := url.Parse(e.URL)
	if err != nil {
		return fmt.Errorf("url %q: %w", e.URL, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("url %q: scheme must be http or https", e.URL)
	}
	if u.Host == "" {
		return fmt.Errorf("url %q: no host", e.URL)
	}
	if u.User != nil {
		return fmt.Errorf("url %q: credentials in the URL would leak into logs and metrics; use basic_auth with password_file", redactURL(u))
	}
	if e.Name == "" {
		e.Name = u.Host + strings.TrimSuffix(u.Path, "/")
	}
	if e.Timeout == 0 {
		e.Timeout = DefaultTimeout
	}
	if e.Timeout < 0 {
		return fmt.Errorf("endpoint %q: timeout must be positive, got %v", e.Name, e.Timeout)
	}
	if e.BasicAuth != nil {
		if e.BearerTokenFile != "" {
			return fmt.Errorf("endpoint %q: basic_auth and bearer_token_file are mutually exclusive", e.Name)
		}
		if e.BasicAuth.Username == "" || e.BasicAuth.PasswordFile == "" {
			return fmt.Errorf("endpoint %q: basic_auth needs username and password_file, got username %q password_file %q",
				e.Name, e.BasicAuth.Username, e.BasicAuth.PasswordFile)
		}
	}
	if (e.TLS.CertFile == "") != (e.TLS.KeyFile == "") {
		return fmt.Errorf("endpoint %q: tls cert_file %q and key_file %q: set both or neither", e.Name, e.TLS.CertFile, e.TLS.KeyFile)
	}
	for k := range e.Headers {
		for _, r := range reservedHeaders {
			if strings.EqualFold(k, r) {
				return fmt.Errorf("endpoint %q: header %q is set by kubezonnet and cannot be overridden", e.Name, k)
			}
		}
		if !validHeaderName(k) {
			return fmt.Errorf("endpoint %q: invalid header name %q", e.Name, k)
		}
	}
	return nil
}

func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c <= ' ' || c >= 0x7f || strings.ContainsRune(`()<>@,;:\"/[]?={}`, c) {
			return false
		}
	}
	return http.CanonicalHeaderKey(s) != ""
}

func redactURL(u *url.URL) string {
	c := *u
	c.User = nil
	return c.String()
}

// FileConfig is the YAML file given with --remote-write-config:
//
//	endpoints:
//	  - url: https://mimir.example/api/v1/push
//	    name: mimir
//	    timeout: 10s
//	    basic_auth: {username: kubezonnet, password_file: /secrets/password}
//	    tls: {ca_file: /secrets/ca.crt}
//	    headers: {X-Scope-OrgID: platform}
//	external_labels: {cluster: prod-eu}
//	ha: {cluster: prod-eu, replica: kubezonnet-0}
type FileConfig struct {
	Endpoints      []EndpointConfig  `yaml:"endpoints"`
	ExternalLabels map[string]string `yaml:"external_labels"`
	HA             HAConfig          `yaml:"ha"`
}

// LoadFileConfig reads and strictly decodes a --remote-write-config file:
// unknown fields are errors, so a typo never silently disables auth.
func LoadFileConfig(path string) (FileConfig, error) {
	var fc FileConfig
	f, err := os.Open(path)
	if err != nil {
		return fc, fmt.Errorf("--remote-write-config: %w", err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	if err := dec.Decode(&fc); err != nil && !errors.Is(err, io.EOF) {
		return fc, fmt.Errorf("--remote-write-config %s: %w", path, err)
	}
	return fc, nil
}
