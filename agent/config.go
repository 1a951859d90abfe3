// Package agent is the node agent: it loads the eBPF datapath, tells it
// which sources are local to the node, drains its counts every flush
// interval and ships them to the server as Prometheus remote-write, exactly
// once (see internal/wire for the contract).
package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/command"
)

// Attach modes.
const (
	// AttachNetfilter hooks POSTROUTING (IPv4 and IPv6) in the node's
	// network namespace: sees forwarded pod traffic and host traffic.
	AttachNetfilter = "netfilter"
	// AttachCgroup hooks cgroup_skb egress on the cgroup v2 root, for
	// dataplanes that bypass netfilter (Cilium eBPF host routing).
	AttachCgroup = "cgroup"
)

// LocalPrefixesAuto asks the agent to learn its local prefixes from its own
// Node object: spec.podCIDRs plus the node's addresses.
const LocalPrefixesAuto = "auto"

// Defaults, with the reason for each.
const (
	// DefaultFlushInterval: counts reach the server within ~10 s, and a
	// 10 s drain keeps the kernel maps far from full on a busy node.
	DefaultFlushInterval = 10 * time.Second
	// DefaultMaxBufferedFlows bounds the flows held while the server is
	// unreachable (~100 bytes each: ~25 MiB). Counts of a known flow keep
	// merging; only new flows beyond the bound are dropped and counted.
	DefaultMaxBufferedFlows = 262144
	// DefaultPrefixRefresh: how often the Node object is re-read for pod
	// CIDR and address changes (one GET, no cluster-wide watch).
	DefaultPrefixRefresh = time.Minute
	// DefaultShutdownTimeout bounds the final drain and send on SIGTERM,
	// inside Kubernetes' default 30 s grace period.
	DefaultShutdownTimeout = 10 * time.Second
)

// Config is everything the agent needs, decoded from flags and validated
// before anything is loaded.
type Config struct {
	ServerURL         string
	NodeName          string
	FlushInterval     time.Duration
	AttachMode        string
	NetfilterPriority int
	NetnsPath         string
	CgroupPath        string
	MaxFlows          int
	// FlowTableMemory bounds the kernel flow table, in MiB.
	FlowTableMemory  int
	MaxBufferedFlows int
	// LocalPrefixes is nil in auto mode.
	LocalPrefixes      []netip.Prefix
	ExtraLocalPrefixes []netip.Prefix
	PrefixRefresh      time.Duration
	Kubeconfig         string
	TokenFile          string
	ListenAddress      string
	Log                command.Log
	ShutdownTimeout    time.Duration
	// RetryMin and RetryMax bound the backoff between send attempts.
	RetryMin, RetryMax time.Duration
	// ReportReleases follows the node's pod host routes and reports the
	// addresses their pods release (wire.Batch.Released), in the
	// namespace of NetnsPath.
	ReportReleases bool
}

// Flags returns the agent's flags; each has a KUBEZONNET_* environment
// variable twin so a DaemonSet can set them either way.
func Flags() []cli.Flag {
	fs := []cli.Flag{
		&cli.StringFlag{Name: "server-url", Usage: "base URL of the kubezonnet server; batches go to <url>/api/v1/write"},
		&cli.StringFlag{Name: "node-name", Usage: "name of this node (from the downward API: spec.nodeName)"},
		&cli.DurationFlag{Name: "flush-interval", Value: DefaultFlushInterval, Usage: "how often the kernel counts are drained and sent"},
		&cli.StringFlag{Name: "attach-mode", Value: AttachNetfilter, Usage: "netfilter (POSTROUTING, default) or cgroup (cgroup_skb egress, for Cilium eBPF host routing)"},
		&cli.IntFlag{Name: "netfilter-priority", Value: bpf.DefaultNetfilterPriority, Usage: "netfilter hook priority; below 100 (source NAT) to see pre-SNAT pod addresses"},
		&cli.StringFlag{Name: "netns-path", Usage: "attach netfilter hooks in the network namespace at this path instead of the agent's own (the DaemonSet runs in the host namespace)"},
		&cli.StringFlag{Name: "cgroup-path", Usage: "cgroup v2 directory for cgroup mode (default: the cgroup v2 root, found in /proc/mounts)"},
		&cli.IntFlag{Name: "max-flows", Value: bpf.DefaultMaxFlows, Usage: "capacity of each kernel flow map generation (the flows that neither the flow table nor the flow log takes), and the most flows the flow log adds up between flushes; flows beyond the map are counted as dropped (map_full)"},
		&cli.IntFlag{Name: "flow-table-memory", Value: bpf.DefaultTableMemory >> 20, Usage: "MiB of memory for the kernel flow table and flow log (every possible CPU, 64 bytes a slot or record and a byte a slot for its tag), taken at start; half of each CPU's share holds 2 generations of its table region, the largest power of two of slots that fits, at most 4096, of which it uses about twice the flows it sees per flush interval; the rest the slots' tags and a ring of the log, where the packets of the flows beyond go, read every 1ms to 100ms as it fills; what a full ring cannot take counts in the slower --max-flows map"},
		&cli.IntFlag{Name: "max-buffered-flows", Value: DefaultMaxBufferedFlows, Usage: "flows held in memory while the server is unreachable; new flows beyond it are counted as dropped (buffer_full)"},
		&cli.StringFlag{Name: "local-prefixes", Value: LocalPrefixesAuto, Usage: "sources counted on this node: auto (the Node's spec.podCIDRs and addresses) or comma-separated CIDRs (for IPAMs that do not fill podCIDRs, e.g. Cilium cluster-pool)"},
		&cli.StringFlag{Name: "extra-local-prefixes", Usage: "comma-separated CIDRs added to the local prefixes"},
		&cli.DurationFlag{Name: "prefix-refresh-interval", Value: DefaultPrefixRefresh, Usage: "how often the Node is re-read in auto mode"},
		&cli.StringFlag{Name: "kubeconfig", Usage: "kubeconfig for reading this node's Node object (default: in-cluster)"},
		&cli.StringFlag{Name: "token-file", Usage: "file with the bearer token sent to the server, re-read before every request"},
		&cli.StringFlag{Name: "listen-address", Value: ":9400", Usage: "address of the agent's /metrics, /healthz and /readyz (empty disables)"},
		&cli.DurationFlag{Name: "shutdown-timeout", Value: DefaultShutdownTimeout, Usage: "time allowed for the final drain and send on SIGTERM"},
		&cli.DurationFlag{Name: "retry-min-backoff", Value: 500 * time.Millisecond, Usage: "first delay before resending a failed batch"},
		&cli.DurationFlag{Name: "retry-max-backoff", Value: 30 * time.Second, Usage: "cap of the exponential backoff between resends"},
		&cli.BoolFlag{Name: "report-releases", Value: true, Usage: "follow the host routes of this node's pods (ptp CNIs: Calico, kindnet, Cilium native routing) and report each address a pod releases, at once, so that the server never credits the next pod's flows to the deleted one (false: the server's informer alone places a reused address)"},
	}
	return command.WithEnv(append(fs, command.LogFlags()...))
}

// datapathConfig sizes the kernel datapath from the flags. Whether the
// flow table's memory suffices for this node's CPUs is checked at load
// (bpf.TableGeometry).
func (c *Config) datapathConfig() bpf.Config {
	return bpf.Config{MaxFlows: uint32(c.MaxFlows), TableMemory: uint64(c.FlowTableMemory) << 20}
}

// serverWriteURL is where batches go.
func (c *Config) serverWriteURL() string {
	return strings.TrimSuffix(c.ServerURL, "/") + "/api/v1/write"
}

// ConfigFromCLI decodes and validates the flags.
func ConfigFromCLI(c *cli.Context) (Config, error) {
	cfg := Config{
		ServerURL:         c.String("server-url"),
		NodeName:          c.String("node-name"),
		FlushInterval:     c.Duration("flush-interval"),
		AttachMode:        c.String("attach-mode"),
		NetfilterPriority: c.Int("netfilter-priority"),
		NetnsPath:         c.String("netns-path"),
		CgroupPath:        c.String("cgroup-path"),
		MaxFlows:          c.Int("max-flows"),
		FlowTableMemory:   c.Int("flow-table-memory"),
		MaxBufferedFlows:  c.Int("max-buffered-flows"),
		PrefixRefresh:     c.Duration("prefix-refresh-interval"),
		Kubeconfig:        c.String("kubeconfig"),
		TokenFile:         c.String("token-file"),
		ListenAddress:     c.String("listen-address"),
		Log:               command.LogFromCLI(c),
		ShutdownTimeout:   c.Duration("shutdown-timeout"),
		RetryMin:          c.Duration("retry-min-backoff"),
		RetryMax:          c.Duration("retry-max-backoff"),
		ReportReleases:    c.Bool("report-releases"),
	}
	var err error
	if lp := c.String("local-prefixes"); lp != LocalPrefixesAuto {
		if cfg.LocalPrefixes, err = parsePrefixes("local-prefixes", lp); err != nil {
			return cfg, err
		}
		if len(cfg.LocalPrefixes) == 0 {
			return cfg, fmt.Errorf("--local-prefixes: empty; use %q or list CIDRs", LocalPrefixesAuto)
		}
	}
	if cfg.ExtraLocalPrefixes, err = parsePrefixes("extra-local-prefixes", c.String("extra-local-prefixes")); err != nil {
		return cfg, err
	}
	return cfg, cfg.Validate()
}

// parsePrefixes parses a comma-separated CIDR list; a bare address is a
// single-address prefix.
func parsePrefixes(flag, s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			a, aerr := netip.ParseAddr(f)
			if aerr != nil {
				return nil, fmt.Errorf("--%s: invalid CIDR %q", flag, f)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// Validate checks every field and names the flag of the first bad one.
func (c *Config) Validate() error {
	var errs []error
	u, err := url.Parse(c.ServerURL)
	switch {
	case c.ServerURL == "":
		errs = append(errs, errors.New("--server-url: required"))
	case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "":
		errs = append(errs, fmt.Errorf("--server-url: invalid URL %q (want http:// or https://host[:port])", c.ServerURL))
	}
	if c.NodeName == "" {
		errs = append(errs, errors.New("--node-name: required (set KUBEZONNET_NODE_NAME from the downward API spec.nodeName)"))
	}
	if c.FlushInterval < 100*time.Millisecond {
		errs = append(errs, fmt.Errorf("--flush-interval: %s is below the minimum of 100ms", c.FlushInterval))
	}
	switch c.AttachMode {
	case AttachNetfilter:
		if c.NetfilterPriority <= -2147483648 || c.NetfilterPriority >= 2147483647 {
			errs = append(errs, fmt.Errorf("--netfilter-priority: %d is reserved by netfilter", c.NetfilterPriority))
		}
		if c.NetnsPath != "" {
			if _, err := os.Stat(c.NetnsPath); err != nil {
				errs = append(errs, fmt.Errorf("--netns-path: %w", err))
			}
		}
	case AttachCgroup:
		if c.NetnsPath != "" {
			errs = append(errs, errors.New("--netns-path: only valid with --attach-mode=netfilter"))
		}
	default:
		errs = append(errs, fmt.Errorf("--attach-mode: unknown mode %q (want %s or %s)", c.AttachMode, AttachNetfilter, AttachCgroup))
	}
	if c.MaxFlows < 1 || c.MaxFlows > 1<<24 {
		errs = append(errs, fmt.Errorf("--max-flows: %d out of range [1, %d]", c.MaxFlows, 1<<24))
	}
	if c.FlowTableMemory < 1 || c.FlowTableMemory > bpf.MaxTableBytes>>20 {
		errs = append(errs, fmt.Errorf("--flow-table-memory: %d MiB out of range [1, %d]", c.FlowTableMemory, bpf.MaxTableBytes>>20))
	}
	if c.MaxBufferedFlows < 1 {
		errs = append(errs, fmt.Errorf("--max-buffered-flows: %d must be positive", c.MaxBufferedFlows))
	}
	if n := len(c.LocalPrefixes) + len(c.ExtraLocalPrefixes); n > bpf.MaxLocalPrefixes {
		errs = append(errs, fmt.Errorf("--local-prefixes: %d prefixes, at most %d supported", n, bpf.MaxLocalPrefixes))
	}
	if c.LocalPrefixes == nil && c.PrefixRefresh < time.Second {
		errs = append(errs, fmt.Errorf("--prefix-refresh-interval: %s is below the minimum of 1s", c.PrefixRefresh))
	}
	if c.TokenFile != "" {
		if _, err := os.Stat(c.TokenFile); err != nil {
			errs = append(errs, fmt.Errorf("--token-file: %w", err))
		}
	}
	if err := c.Log.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.ShutdownTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--shutdown-timeout: %s must be positive", c.ShutdownTimeout))
	}
	if c.RetryMin <= 0 || c.RetryMax < c.RetryMin {
		errs = append(errs, fmt.Errorf("--retry-min-backoff/--retry-max-backoff: %s/%s: want 0 < min <= max", c.RetryMin, c.RetryMax))
	}
	return errors.Join(errs...)
}
