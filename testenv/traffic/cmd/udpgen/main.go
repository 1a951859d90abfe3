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
	"time"

	"github.com/kubezonnet/kubezonnet/testenv/traffic"
)

func main() {
	var g traffic.Generator
	g.FirstPort, g.Flows, g.Payload, g.Duration = 1024, 1, 64, 10*time.Second
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
