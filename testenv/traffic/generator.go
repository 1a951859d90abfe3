package traffic

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/kubezonnet/kubezonnet/internal/testnet"
)

// Generator sends UDP datagrams as fast as one socket can, round robin
// to a set of destination ports, from one thread pinned to one CPU. It
// runs in a process of its own (cmd/udpgen), started by the benchmark for
// each UDP run: in the benchmark's process it would share the Go
// scheduler with the remote-write receiver, whose work grows with the
// flows the agent reports, and the rates would measure that work. (The
// benchmark keeps itself off the generator's CPU, which leaves it one
// CPU on a two-CPU machine, and Go then runs it with GOMAXPROCS 1: a
// sending goroutine and the receiver would take turns on one P.)
type Generator struct {
	// NS is the network namespace to send from.
	NS string
	// Src is the socket's address.
	Src netip.AddrPort
	// Dst is the destination address.
	Dst netip.Addr
	// FirstPort is the first destination port; the datagrams go to Flows
	// ports from it.
	FirstPort int
	// Flows is the number of destination ports, each a flow.
	Flows int
	// Rotate, when not zero, moves the set to the Flows ports after it
	// every Rotate, and back: each interval's flows are new.
	Rotate time.Duration
	// Payload is the UDP payload of each datagram, in bytes.
	Payload int
	// Duration is how long to send.
	Duration time.Duration
	// CPU is the CPU the sending thread stays on: the datagrams' way
	// through the namespaces runs in its softirqs, on that CPU.
	CPU int
}

// GeneratorResult is what a Generator sent, and in how long.
type GeneratorResult struct {
	Sent    uint64        `json:"sent"`
	Elapsed time.Duration `json:"elapsed_ns"`
}

// maxUDPPayload is the largest UDP payload of an IPv4 datagram.
const maxUDPPayload = 65507

// udpBatch is the number of datagrams per sendmmsg call.
const udpBatch = 64

// ports is how many destination ports g sends to: its flows, and as
// many again when the set rotates.
func (g Generator) ports() int {
	if g.Rotate > 0 {
		return 2 * g.Flows
	}
	return g.Flows
}

// Validate reports the first field that cannot work, naming it.
func (g Generator) Validate() error {
	span := g.ports()
	switch {
	case g.NS == "":
		return errors.New("generator: no network namespace")
	case !g.Src.IsValid() || !g.Src.Addr().Is4():
		return fmt.Errorf("generator: source %q is not an IPv4 address and port", g.Src)
	case !g.Dst.Is4():
		return fmt.Errorf("generator: destination %q is not an IPv4 address", g.Dst)
	case g.Flows < 1:
		return fmt.Errorf("generator: %d flows: need at least 1", g.Flows)
	case g.FirstPort < 1 || g.FirstPort+span-1 > 65535:
		return fmt.Errorf("generator: ports %d to %d (the flows from the first port, twice as many when rotating) go past the valid ports 1 to 65535", g.FirstPort, g.FirstPort+span-1)
	case g.Rotate < 0:
		return fmt.Errorf("generator: rotate %s is negative", g.Rotate)
	case g.Payload < 0 || g.Payload > maxUDPPayload:
		return fmt.Errorf("generator: payload %d bytes: want 0 to %d", g.Payload, maxUDPPayload)
	case g.Duration <= 0:
		return fmt.Errorf("generator: duration %s: want more than 0", g.Duration)
	case g.CPU < 0:
		// Not checked against runtime.NumCPU: the benchmark starts the
		// generator with its own CPUs, which leave out the generator's.
		return fmt.Errorf("generator: CPU %d is negative", g.CPU)
	}
	return nil
}

// Run sends for g.Duration, or until ctx ends (then with ctx's error and
// what was sent so far). A full device queue is back pressure, not a
// failure: the call is retried.
func (g Generator) Run(ctx context.Context) (GeneratorResult, error) {
	if err := g.Validate(); err != nil {
		return GeneratorResult{}, err
	}
	conn, err := testnet.ListenPacket(g.NS, "udp4", g.Src.String())
	if err != nil {
		return GeneratorResult{}, fmt.Errorf("opening the socket in %s: %w", g.NS, err)
	}
	defer conn.Close()
	pc := ipv4.NewPacketConn(conn)
	dsts := make([]*net.UDPAddr, g.ports())
	for i := range dsts {
		dsts[i] = &net.UDPAddr{IP: g.Dst.AsSlice(), Port: g.FirstPort + i}
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var one unix.CPUSet
	one.Set(g.CPU)
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		return GeneratorResult{}, fmt.Errorf("pinning the sender to CPU %d: %w", g.CPU, err)
	}
	payload := make([]byte, g.Payload)
	msgs := make([]ipv4.Message, udpBatch)
	for i := range msgs {
		msgs[i].Buffers = [][]byte{payload}
	}
	var res GeneratorResult
	start := time.Now()
	next := 0 // the next flow of the set
	for {
		now := time.Since(start)
		if now >= g.Duration {
			res.Elapsed = now
			return res, nil
		}
		if err := ctx.Err(); err != nil {
			res.Elapsed = now
			return res, err
		}
		base := 0
		if g.Rotate > 0 && (now/g.Rotate)%2 == 1 {
			base = g.Flows
		}
		for i := range msgs {
			msgs[i].Addr = dsts[base+next]
			if next++; next == g.Flows {
				next = 0
			}
		}
		n, err := pc.WriteBatch(msgs, 0)
		if n > 0 {
			res.Sent += uint64(n)
		}
		if err != nil && !errors.Is(err, syscall.ENOBUFS) && !errors.Is(err, syscall.EAGAIN) {
			res.Elapsed = time.Since(start)
			return res, fmt.Errorf("sending datagrams: %w", err)
		}
	}
}

// Flags defines g's fields as flags of fs, with g's values as defaults:
// the command line of cmd/udpgen, which Args writes.
func (g *Generator) Flags(fs *flag.FlagSet) {
	fs.StringVar(&g.NS, "netns", g.NS, "network namespace to send from")
	fs.Func("src", "source IPv4 address and port", func(v string) (err error) {
		g.Src, err = netip.ParseAddrPort(v)
		return err
	})
	fs.Func("dst", "destination IPv4 address", func(v string) (err error) {
		g.Dst, err = netip.ParseAddr(v)
		return err
	})
	fs.IntVar(&g.FirstPort, "first-port", g.FirstPort, "first destination port")
	fs.IntVar(&g.Flows, "flows", g.Flows, "destination ports, round robin, each a flow")
	fs.DurationVar(&g.Rotate, "rotate", g.Rotate, "move to the next set of ports, and back, this often (0: never)")
	fs.IntVar(&g.Payload, "payload", g.Payload, "UDP payload bytes")
	fs.DurationVar(&g.Duration, "duration", g.Duration, "how long to send")
	fs.IntVar(&g.CPU, "cpu", g.CPU, "CPU of the sending thread")
}

// Args returns the command line of cmd/udpgen that runs g.
func (g Generator) Args() []string {
	return []string{
		"-netns", g.NS,
		"-src", g.Src.String(),
		"-dst", g.Dst.String(),
		"-first-port", fmt.Sprint(g.FirstPort),
		"-flows", fmt.Sprint(g.Flows),
		"-rotate", g.Rotate.String(),
		"-payload", fmt.Sprint(g.Payload),
		"-duration", g.Duration.String(),
		"-cpu", fmt.Sprint(g.CPU),
	}
}
