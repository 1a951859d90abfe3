// Command kubezonnet attributes cross-zone network traffic to Kubernetes pods
// and workloads. One binary, one subcommand per role; see README.md.
package main

import (
	"fmt"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/kubezonnet/kubezonnet/internal/version"
)

func main() {
	app := &cli.App{
		Name:     "kubezonnet",
		Usage:    "who sends bytes across availability zones, per pod pair and workload",
		Version:  version.Version,
		Commands: commands(),
	}
	if err := app.Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "kubezonnet:", err)
		os.Exit(1)
	}
}
