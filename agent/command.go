package agent

import (
	"context"
	"errors"
	"fmt"

	"log/slog"

	"github.com/urfave/cli/v2"

	"github.com/kubezonnet/kubezonnet/bpf"
	"github.com/kubezonnet/kubezonnet/internal/command"
)

// Command is `kubezonnet agent`.
func Command() *cli.Command {
	return &cli.Command{
		Name:   "agent",
		Usage:  "count bytes leaving this node's pods with eBPF and send them to the server",
		Flags:  Flags(),
		Action: command.Action("agent", ConfigFromCLI, func(c *Config) command.Log { return c.Log }, run),
	}
}

// run loads and attaches the datapath, then runs the agent until ctx ends.
func run(ctx context.Context, cfg Config, log *slog.Logger) error {
	var nodes nodeGetter
	if cfg.LocalPrefixes == nil {
		var err error
		if nodes, err = newNodeGetter(cfg.Kubeconfig); err != nil {
			return err
		}
	}
	dp, err := bpf.Load(cfg.datapathConfig())
	if err != nil {
		return fmt.Errorf("loading the eBPF datapath: %w", err)
	}
	a, err := New(cfg, dp, nodes, log)
	if err != nil {
		dp.Close()
		return err
	}
	// Prefixes first, so that the hook counts from its first packet.
	if err := a.refreshPrefixes(ctx); err != nil {
		dp.Close()
		return err
	}
	switch cfg.AttachMode {
	case AttachNetfilter:
		err = dp.AttachNetfilter(cfg.NetnsPath, int32(cfg.NetfilterPriority))
	case AttachCgroup:
		path := cfg.CgroupPath
		if path == "" {
			if path, err = bpf.CgroupV2Mount(); err != nil {
				break
			}
		}
		err = dp.AttachCgroup(path)
		if errors.Is(err, bpf.ErrSocketHookTaken) {
			// Counting works; only Service attribution is missing.
			log.Warn("attaching the cgroup socket programs", "err", err)
			err = nil
		}
	}
	if err != nil {
		dp.Close()
		return err
	}
	if cfg.ListenAddress != "" {
		srvCtx, stopSrv := context.WithCancel(ctx)
		srvErr := make(chan error, 1)
		go func() { srvErr <- a.Serve(srvCtx, cfg.ListenAddress) }()
		defer func() {
			stopSrv()
			if err := <-srvErr; err != nil {
				log.Error("metrics endpoint", "err", err)
			}
		}()
	}
	return a.Run(ctx)
}
