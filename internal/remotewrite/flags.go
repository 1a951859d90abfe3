package remotewrite

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/urfave/cli/v2"
)

// Flag names, shared by Flags and ConfigFromCLI.
const (
	flagURL            = "remote-write-url"
	flagConfig         = "remote-write-config"
	flagInterval       = "push-interval"
	flagExternalLabel  = "external-label"
	flagRetryOn429     = "remote-write-retry-on-429"
	flagMaxSeries      = "remote-write-max-series-per-request"
	flagShards         = "remote-write-shards"
	flagTimeout        = "remote-write-timeout"
	flagMinBackoff     = "remote-write-min-backoff"
	flagMaxBackoff     = "remote-write-max-backoff"
	flagHACluster      = "remote-write-ha-cluster"
	flagHAReplica      = "remote-write-ha-replica"
	flagCategoryRemote = "Remote write:"
)

// Flags returns the remote-write flags for the server command. They are
// built fresh on each call (no package-level flag state).
func Flags() []cli.Flag {
	return []cli.Flag{
		&cli.StringSliceFlag{Name: flagURL, Category: flagCategoryRemote,
			Usage: "remote-write endpoint URL, e.g. http://prometheus:9090/api/v1/write (repeatable; use --remote-write-config for auth, TLS and headers)"},
		&cli.PathFlag{Name: flagConfig, Category: flagCategoryRemote,
			Usage: "YAML file listing endpoints (url, name, timeout, basic_auth, bearer_token_file, tls, headers), external_labels and ha"},
		&cli.DurationFlag{Name: flagInterval, Category: flagCategoryRemote,
			Value: DefaultPushInterval, Usage: "how often every live series is pushed"},
		&cli.StringSliceFlag{Name: flagExternalLabel, Category: flagCategoryRemote,
			Usage: "name=value label added to every pushed series, e.g. cluster=prod (repeatable)"},
		&cli.BoolFlag{Name: flagRetryOn429, Category: flagCategoryRemote,
			Value: true, Usage: "retry 429 Too Many Requests honouring Retry-After (turn off for Cortex/Mimir limits)"},
		&cli.IntFlag{Name: flagMaxSeries, Category: flagCategoryRemote,
			Value: DefaultMaxSeriesPerRequest, Usage: "maximum series in one request"},
		&cli.IntFlag{Name: flagShards, Category: flagCategoryRemote,
			Value: DefaultShards, Usage: "concurrent requests per endpoint"},
		&cli.DurationFlag{Name: flagTimeout, Category: flagCategoryRemote,
			Value: DefaultTimeout, Usage: "timeout of one request to an endpoint given with --remote-write-url"},
		&cli.DurationFlag{Name: flagMinBackoff, Category: flagCategoryRemote,
			Value: DefaultMinBackoff, Usage: "first wait before retrying a failed request"},
		&cli.DurationFlag{Name: flagMaxBackoff, Category: flagCategoryRemote,
			Value: DefaultMaxBackoff, Usage: "longest wait between retries"},
		&cli.StringFlag{Name: flagHACluster, Category: flagCategoryRemote,
			Usage: "HA tracker cluster label value (Mimir/Cortex); needs --remote-write-ha-replica"},
		&cli.StringFlag{Name: flagHAReplica, Category: flagCategoryRemote,
			Usage: "HA tracker replica label value, e.g. the pod name"},
	}
}

// ConfigFromCLI decodes the flags of Flags (and the file named by
// --remote-write-config) into a validated PusherConfig. Endpoints from
// --remote-write-url come first, then those of the file; external labels
// of both are merged and a name given twice is an error.
func ConfigFromCLI(c *cli.Context) (PusherConfig, error) {
	cfg := DefaultPusherConfig()
	cfg.Interval = c.Duration(flagInterval)
	cfg.RetryOn429 = c.Bool(flagRetryOn429)
	cfg.MaxSeriesPerRequest = c.Int(flagMaxSeries)
	cfg.Shards = c.Int(flagShards)
	cfg.MinBackoff = c.Duration(flagMinBackoff)
	cfg.MaxBackoff = c.Duration(flagMaxBackoff)
	cfg.HA = HAConfig{Cluster: c.String(flagHACluster), Replica: c.String(flagHAReplica)}
	timeout := c.Duration(flagTimeout)
	if timeout <= 0 {
		return cfg, fmt.Errorf("--%s: must be positive, got %v", flagTimeout, timeout)
	}
	for _, u := range c.StringSlice(flagURL) {
		cfg.Endpoints = append(cfg.Endpoints, EndpointConfig{URL: u, Timeout: timeout})
	}
	for _, kv := range c.StringSlice(flagExternalLabel) {
		name, value, ok := strings.Cut(kv, "=")
		if !ok {
			return cfg, fmt.Errorf("--%s %q: want name=value", flagExternalLabel, kv)
		}
		cfg.ExternalLabels = append(cfg.ExternalLabels, metrics.Label{Name: name, Value: value})
	}
	if path := c.Path(flagConfig); path != "" {
		fc, err := LoadFileConfig(path)
		if err != nil {
			return cfg, err
		}
		if err := cfg.merge(fc); err != nil {
			return cfg, fmt.Errorf("--%s %s: %w", flagConfig, path, err)
		}
	}
	if err := cfg.Validate(); err != nil {
		return cfg, err
	}
	return cfg, nil
}

// merge adds a config file's settings. Flags and file may both set HA
// labels only if they agree, so two sources of truth cannot drift apart.
func (c *PusherConfig) merge(fc FileConfig) error {
	c.Endpoints = append(c.Endpoints, fc.Endpoints...)
	names := make([]string, 0, len(fc.ExternalLabels))
	for n := range fc.ExternalLabels {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		if slices.ContainsFunc(c.ExternalLabels, func(l metrics.Label) bool { return l.Name == n }) {
			return fmt.Errorf("external_labels: %q is also set by --%s", n, flagExternalLabel)
		}
		c.ExternalLabels = append(c.ExternalLabels, metrics.Label{Name: n, Value: fc.ExternalLabels[n]})
	}
	if fc.HA != (HAConfig{}) {
		if c.HA.Cluster != "" || c.HA.Replica != "" {
			if fc.HA.Cluster != c.HA.Cluster || fc.HA.Replica != c.HA.Replica {
				return errors.New("ha: also set by --remote-write-ha-cluster/--remote-write-ha-replica with other values")
			}
		}
		c.HA = fc.HA
	}
	return nil
}
