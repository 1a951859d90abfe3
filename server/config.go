package server

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/kubezonnet/kubezonnet/internal/command"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/wire"
	"github.com/kubezonnet/kubezonnet/server/aggregate"
	"github.com/kubezonnet/kubezonnet/server/flowlog"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// Defaults of the server flags, with the reason for each.
const (
	// DefaultSeriesIdleTimeout outlives several agent flush intervals and
	// remote-write outages, yet ends the series of deleted pods promptly.
	DefaultSeriesIdleTimeout = 10 * time.Minute
	// DefaultMaxBodyBytes fits an agent batch of ~100k flows (snappy).
	DefaultMaxBodyBytes = 16 << 20
	// DefaultIncarnationTTL must exceed the longest an agent may keep
	// retrying one batch; an agent silent for longer restarts anyway.
	DefaultIncarnationTTL = time.Hour
	// DefaultMaxIncarnations: 10x a 1,000-node cluster's agents, so that
	// restarts never evict a live incarnation.
	DefaultMaxIncarnations = 10_000
	// DefaultMaxAgentSeries: an agent sends a few dozen self-metric series,
	// so this holds those of a few thousand nodes while bounding the memory
	// a misbehaving agent can make the server keep.
	DefaultMaxAgentSeries = 100_000
	// DefaultCheckpointInterval bounds the log a restart replays to about
	// a minute of ingest, and costs one write of the counters a minute.
	DefaultCheckpointInterval = time.Minute
	// DefaultShutdownGracePeriod fits the default 30 s
	// terminationGracePeriodSeconds of a pod with room to spare: the
	// manifests set the grace period explicitly to 30 s.
	DefaultShutdownGracePeriod = 25 * time.Second
	// DefaultAgentServiceAccount is the agent's identity in the deploy/
	// manifests.
	DefaultAgentServiceAccount = "kubezonnet:kubezonnet-agent"
)

// Config is the decoded and validated server command line.
type Config struct {
	ListenAddress       string
	Kubeconfig          string
	AuthMode            string
	TokenFile           string
	AgentServiceAccount string // namespace:name, for --auth-mode tokenreview
	TokenAudience       string // audience of the agents' projected tokens ("" = API server's)
	AllPairs            bool
	MaxPodPairs         int // 0: derived from the memory limit by Run (memlimit.go)
	MaxServiceSeries    int // 0: aggregate.DefaultMaxServiceSeries
	SeriesIdleTimeout   time.Duration
	FlowLogClasses      flowlog.ClassSet
	FlowLogFile         string // "" or "-": stdout
	MaxBodyBytes        int64
	// Limits bound a decoded request; zero fields take wire's defaults.
	Limits          wire.Limits
	IncarnationTTL  time.Duration
	MaxIncarnations int
	MaxAgentSeries  int
	Log             command.Log
	// StateDir holds the write-ahead log and checkpoints; "" means the
	// counters are not durable.
	StateDir            string
	CheckpointInterval  time.Duration
	ShutdownGracePeriod time.Duration
	// KeepOnly runs without a remote-write endpoint. Without it, a
	// configuration with no endpoint is an error rather than a server
	// that never turns ready.
	KeepOnly    bool
	Resolve     resolve.Config
	RemoteWrite remotewrite.PusherConfig
}

// Flags returns the server's flags, remote-write ones included. They are
// built on each call: no package-level flag state.
func Flags() []cli.Flag {
	fs := []cli.Flag{
		&cli.StringFlag{Name: "listen-address", Value: ":8080", Usage: "address of the ingest, health and metrics HTTP server"},
		&cli.PathFlag{Name: "kubeconfig", Usage: "kubeconfig file; empty means in-cluster configuration"},
		&cli.StringFlag{Name: "auth-mode", Value: AuthToken, Usage: "agent authentication: token (shared bearer token from --token-file), tokenreview (ServiceAccount tokens bound to nodes) or none (tests only)"},
		&cli.PathFlag{Name: "token-file", Usage: "file holding the shared bearer token (--auth-mode token); re-read when it changes"},
		&cli.StringFlag{Name: "agent-service-account", Value: DefaultAgentServiceAccount, Usage: "namespace:name of the agents' ServiceAccount (--auth-mode tokenreview)"},
		&cli.StringFlag{Name: "token-audience", Usage: "audience of the agents' projected ServiceAccount tokens (--auth-mode tokenreview); empty means the API server's default"},
		&cli.PathFlag{Name: "static-endpoints-file", Usage: "YAML file of static endpoints (name, zone, region, CIDRs)"},
		&cli.BoolFlag{Name: "all-pairs", Usage: "keep pod-pair series for every class, same-zone included"},
		&cli.IntFlag{Name: "max-pod-pairs", Usage: "live pod-pair series before new pairs fold into their workload pair (_overflow); 0 derives it from the memory limit (GOMEMLIMIT, else the cgroup v2 memory.max; ~2.1 KB of limit per pair)"},
		&cli.IntFlag{Name: "max-service-series", Value: aggregate.DefaultMaxServiceSeries, Usage: "live workload-to-Service series (kubezonnet_service_*) before new ones fold into the Service's _overflow workload"},
		&cli.DurationFlag{Name: "series-idle-timeout", Value: DefaultSeriesIdleTimeout, Usage: "series without traffic for this long expire"},
		&cli.DurationFlag{Name: "released-ip-ttl", Value: resolve.DefaultReleasedIPTTL, Usage: "how long a deleted pod's address still resolves to it for flows seen before; also how long a deleted Service's virtual IP still names it, and how far back the readiness of Service endpoints per zone is remembered"},
		&cli.DurationFlag{Name: "released-ip-reuse-window", Value: resolve.DefaultReuseWindow, Usage: "how much earlier than the informer shows it a new pod may hold a released address: flows after the release go to such a pod, and a batch with such a source address of the agent's node is answered 503 until the new pod is known or the window passed (0: flows after a release go to the released pod)"},
		&cli.IntFlag{Name: "released-ip-cache-size", Value: resolve.DefaultReleasedIPCacheSize, Usage: "released addresses remembered"},
		&cli.StringSliceFlag{Name: "flow-log-classes", Value: cli.NewStringSlice(resolve.ClassCrossZone.String()), Usage: "classes of flows to log (" + strings.Join(resolve.ClassNames(), ", ") + ", all, none)"},
		&cli.StringFlag{Name: "flow-log-file", Usage: "file the flow log is appended to; empty or - means stdout"},
		&cli.Int64Flag{Name: "max-request-bytes", Value: DefaultMaxBodyBytes, Usage: "largest compressed ingest request body"},
		&cli.DurationFlag{Name: "incarnation-ttl", Value: DefaultIncarnationTTL, Usage: "how long an agent incarnation's last batch seq is remembered (de-duplication)"},
		&cli.IntFlag{Name: "max-agent-incarnations", Value: DefaultMaxIncarnations, Usage: "agent incarnations remembered for de-duplication"},
		&cli.IntFlag{Name: "max-agent-series", Value: DefaultMaxAgentSeries, Usage: "agent self-metric series kept and forwarded (kubezonnet_agent_*, all nodes together); beyond it new series are refused and counted"},
		&cli.PathFlag{Name: "state-dir", Usage: "directory for the durable state (write-ahead log and checkpoints): acknowledged batches survive a crash and counters continue after a restart; empty means not durable (a crash loses what was not pushed yet, counters restart at zero)"},
		&cli.DurationFlag{Name: "checkpoint-interval", Value: DefaultCheckpointInterval, Usage: "how often the counters are checkpointed to --state-dir (bounds the log a restart replays)"},
		&cli.DurationFlag{Name: "shutdown-grace-period", Value: DefaultShutdownGracePeriod, Usage: "time from SIGTERM to exit: refuse new batches (503), final push, checkpoint; keep it below the pod's terminationGracePeriodSeconds"},
		&cli.BoolFlag{Name: "keep-only", Usage: "run without a remote-write endpoint (trials, tests): series are kept but not pushed (flows still go to the flow log, counters to --state-dir checkpoints), and /readyz turns ready once the informers have synced. Without it, the server refuses to start with neither --remote-write-url nor --remote-write-config; with either, --keep-only is an error"},
	}
	fs = append(fs, command.LogFlags()...)
	return command.WithEnv(append(fs, remotewrite.Flags()...))
}

// ConfigFromCLI decodes and validates the flags.
func ConfigFromCLI(c *cli.Context) (Config, error) {
	cfg := Config{
		ListenAddress:       c.String("listen-address"),
		Kubeconfig:          c.Path("kubeconfig"),
		AuthMode:            c.String("auth-mode"),
		TokenFile:           c.Path("token-file"),
		AgentServiceAccount: c.String("agent-service-account"),
		TokenAudience:       c.String("token-audience"),
		AllPairs:            c.Bool("all-pairs"),
		MaxPodPairs:         c.Int("max-pod-pairs"),
		MaxServiceSeries:    c.Int("max-service-series"),
		SeriesIdleTimeout:   c.Duration("series-idle-timeout"),
		FlowLogFile:         c.String("flow-log-file"),
		MaxBodyBytes:        c.Int64("max-request-bytes"),
		IncarnationTTL:      c.Duration("incarnation-ttl"),
		MaxIncarnations:     c.Int("max-agent-incarnations"),
		MaxAgentSeries:      c.Int("max-agent-series"),
		Log:                 command.LogFromCLI(c),
		StateDir:            c.Path("state-dir"),
		CheckpointInterval:  c.Duration("checkpoint-interval"),
		ShutdownGracePeriod: c.Duration("shutdown-grace-period"),
		KeepOnly:            c.Bool("keep-only"),
		Resolve: resolve.Config{
			StaticEndpointsFile: c.Path("static-endpoints-file"),
			ReleasedIPTTL:       c.Duration("released-ip-ttl"),
			ReuseWindow:         c.Duration("released-ip-reuse-window"),
			ReleasedIPCacheSize: c.Int("released-ip-cache-size"),
		},
	}
	var classes []string
	for _, v := range c.StringSlice("flow-log-classes") {
		classes = append(classes, strings.Split(v, ",")...)
	}
	set, err := flowlog.ParseClasses(classes)
	if err != nil {
		return cfg, fmt.Errorf("--flow-log-classes %q: %w", strings.Join(classes, ","), err)
	}
	cfg.FlowLogClasses = set
	rw, err := remotewrite.ConfigFromCLI(c)
	if err != nil {
		return cfg, err
	}
	cfg.RemoteWrite = rw
	return cfg, cfg.Validate()
}

// Validate checks the configuration; each error names the flag and value.
func (c *Config) Validate() error {
	var errs []error
	if c.ListenAddress == "" {
		errs = append(errs, errors.New("--listen-address: must not be empty"))
	}
	switch c.AuthMode {
	case AuthToken:
		if c.TokenFile == "" {
			errs = append(errs, errors.New("--token-file: required with --auth-mode token"))
		}
	case AuthTokenReview:
		ns, name, ok := strings.Cut(c.AgentServiceAccount, ":")
		if !ok || ns == "" || name == "" || strings.Contains(name, ":") {
			errs = append(errs, fmt.Errorf("--agent-service-account %q: want namespace:name", c.AgentServiceAccount))
		}
	case AuthNone:
	default:
		errs = append(errs, fmt.Errorf("--auth-mode %q: want %s, %s or %s", c.AuthMode, AuthToken, AuthTokenReview, AuthNone))
	}
	if c.MaxServiceSeries < 0 {
		errs = append(errs, fmt.Errorf("--max-service-series %d: must not be negative", c.MaxServiceSeries))
	}
	if c.MaxPodPairs < 0 {
		errs = append(errs, fmt.Errorf("--max-pod-pairs %d: must not be negative (0 derives it from the memory limit)", c.MaxPodPairs))
	}
	if c.SeriesIdleTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--series-idle-timeout %s: must be positive", c.SeriesIdleTimeout))
	}
	if c.MaxBodyBytes <= 0 {
		errs = append(errs, fmt.Errorf("--max-request-bytes %d: must be positive", c.MaxBodyBytes))
	}
	if c.IncarnationTTL <= 0 {
		errs = append(errs, fmt.Errorf("--incarnation-ttl %s: must be positive", c.IncarnationTTL))
	}
	if c.MaxIncarnations <= 0 {
		errs = append(errs, fmt.Errorf("--max-agent-incarnations %d: must be positive", c.MaxIncarnations))
	}
	if c.MaxAgentSeries <= 0 {
		errs = append(errs, fmt.Errorf("--max-agent-series %d: must be positive", c.MaxAgentSeries))
	}
	if c.CheckpointInterval <= 0 {
		errs = append(errs, fmt.Errorf("--checkpoint-interval %s: must be positive", c.CheckpointInterval))
	}
	if c.ShutdownGracePeriod < 2*time.Second {
		errs = append(errs, fmt.Errorf("--shutdown-grace-period %s: must be at least 2s (a final push and a checkpoint)", c.ShutdownGracePeriod))
	}
	// A server with nowhere to push would run without ever turning
	// ready, which looks healthy until someone misses the series: running
	// without an endpoint must be asked for by name.
	switch {
	case !c.RemoteWrite.Enabled() && !c.KeepOnly:
		errs = append(errs, errors.New("no remote-write endpoint: set --remote-write-url or --remote-write-config (or --keep-only to run without pushing)"))
	case c.RemoteWrite.Enabled() && c.KeepOnly:
		errs = append(errs, fmt.Errorf("--keep-only: conflicts with the %d remote-write endpoint(s) of --remote-write-url and --remote-write-config: drop one or the other", len(c.RemoteWrite.Endpoints)))
	}
	if err := c.Log.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Resolve.Validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// serviceAccountUser is the TokenReview username of the agents.
func (c *Config) serviceAccountUser() string {
	ns, name, _ := strings.Cut(c.AgentServiceAccount, ":")
	return "system:serviceaccount:" + ns + ":" + name
}
