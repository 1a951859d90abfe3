// Command udpgen is the traffic benchmark's UDP generator (traffic.Generator)
// as a process of its own: it sends datagrams from a network namespace, as
// fast as one socket can, from a thread pinned to one CPU, and prints what
// it sent as one JSON line on stdout. The benchmark starts it for each UDP
// run; it needs root (to enter the namespace).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/kubezonnet/kubezonnet/testenv/traffic"
)

func main() {
	var g traffic.Generator
	g.Flows, g.Payload = 1, 64
	g.Flags(flag.CommandLine)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := g.Run(ctx)
	if err != nil {
		fmt.Fprintf(os.Stderr, "udpgen: %v\n", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fmt.Fprintf(os.Stderr, "udpgen: %v\n", err)
		os.Exit(1)
	}
}
