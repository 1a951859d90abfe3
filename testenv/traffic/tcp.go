package traffic

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/testenv"
)

// iperfPort is the iperf3 server's port in the server pod.
const iperfPort = 5201

// iperfResult is one iperf3 test as its receiver saw it.
type iperfResult struct {
	bitsPerSecond float64
	retransmits   int64
}

// runIperf runs one iperf3 test of d (whole seconds, rounded up) from the
// client pod to a one-off server in the server pod, and returns once every
// packet of both connections (control and data) has passed node a.
func runIperf(ctx context.Context, w *world, d time.Duration, opts Options) (iperfResult, error) {
	srv, err := testenv.StartProcess("iperf3-server", "iperf3",
		[]string{"-s", "-1", "-B", w.server.IPv4.String(), "-p", strconv.Itoa(iperfPort)},
		testenv.ProcessOptions{Netns: w.server.NS, Output: opts.ProgramOutput})
	if err != nil {
		return iperfResult{}, err
	}
	defer srv.Kill()
	if err := waitListening(ctx, w.server.NS, iperfPort, srv); err != nil {
		return iperfResult{}, err
	}
	secs := strconv.Itoa(int(math.Ceil(d.Seconds())))
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", w.client.NS,
		"iperf3", "-c", w.server.IPv4.String(), "-p", strconv.Itoa(iperfPort), "-t", secs, "-J")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var rep struct {
		End struct {
			SumSent struct {
				Retransmits int64 `json:"retransmits"`
			} `json:"sum_sent"`
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if jerr := json.Unmarshal(out, &rep); jerr != nil || err != nil || rep.Error != "" {
		return iperfResult{}, fmt.Errorf("iperf3 client: %v %s: %s%s", err, rep.Error, bytes.TrimSpace(stderr.Bytes()), out)
	}
	select {
	case <-srv.Done():
	case <-time.After(10 * time.Second):
		return iperfResult{}, fmt.Errorf("iperf3 server still running 10s after its test; output:\n%s", srv.Output())
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := testnet.WaitNoLastACK(wctx, w.server.NS); err != nil {
		return iperfResult{}, err
	}
	return iperfResult{bitsPerSecond: rep.End.SumReceived.BitsPerSecond, retransmits: rep.End.SumSent.Retransmits}, nil
}

// waitListening waits until a TCP socket listens on port in ns.
func waitListening(ctx context.Context, ns string, port int, p *testenv.Process) error {
	deadline := time.Now().Add(10 * time.Second)
	suffix := ":" + strconv.Itoa(port)
	for {
		out, err := testnet.Exec(ctx, ns, "ss", "-Htln")
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(out), "\n") {
			if f := strings.Fields(line); len(f) >= 4 && strings.HasSuffix(f[3], suffix) {
				return nil
			}
		}
		select {
		case <-p.Done():
			return fmt.Errorf("iperf3 server exited: %v; output:\n%s", p.Err(), p.Output())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond): // the poll interval
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listens on port %d in %s after 10s", port, ns)
		}
	}
}
