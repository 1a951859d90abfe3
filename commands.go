package main

import (
	"github.com/urfave/cli/v2"

	"github.com/kubezonnet/kubezonnet/agent"
	"github.com/kubezonnet/kubezonnet/server"
)

// commands lists the subcommands; each role's package builds its own.
func commands() []*cli.Command {
	return []*cli.Command{
		agent.Command(),
		server.Command(),
	}
}
