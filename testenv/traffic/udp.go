package traffic

import (
	"context"
	"encoding/json"
	"errors"
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

// UDP ports of the generator. A flow is a destination port: the datapath
// keys flows by the lower of the two ports, and the source port is above
// every destination port. Two flow sets of up to 32,000 ports fit between
// them, so a rotating case never sends to the previous set's ports.
const (
	udpSourcePort = 65535
	udpFirstPort  = 1024
	udpPorts      = 64000
)

// udpBatch is the number of datagrams per sendmmsg call.
const udpBatch = 64

// udpResult is what the generator sent and how long it took.
type udpResult struct {
	sent    uint64
	elapsed time.Duration
}

// sendUDP sends 64-byte (c.Payload) datagrams from the client pod to the
// server pod as fast as one socket can, for d: to c.Flows destination
// ports round robin, the set moving to fresh ports every c.Rotate.
func sendUDP(ctx context.Context, w *world, c Case, d time.Duration) (udpResult, error) {
	if c.Flows < 1 || (c.Rotate > 0 && 2*c.Flows > udpPorts) || c.Flows > udpPorts {
		return udpResult{}, fmt.Errorf("%d flows do not fit the generator's %d ports", c.Flows, udpPorts)
	}
	conn, err := testnet.ListenPacket(w.client.NS, "udp4", netip.AddrPortFrom(w.client.IPv4, udpSourcePort).String())
	if err != nil {
		return udpResult{}, err
	}
	defer conn.Close()
	pc := ipv4.NewPacketConn(conn)
	dsts := make([]*net.UDPAddr, udpPorts)
	for i := range dsts {
		dsts[i] = &net.UDPAddr{IP: w.server.IPv4.AsSlice(), Port: udpFirstPort + i}
	}
	// The sender stays on one CPU, the last: the datagrams' way through
	// the namespaces runs in its softirqs on that CPU, so every run sees
	// the same placement, not whatever the scheduler chose.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var all, one unix.CPUSet
	if err := unix.SchedGetaffinity(0, &all); err != nil {
		return udpResult{}, fmt.Errorf("reading the sender's CPUs: %w", err)
	}
	one.Set(generatorCPU())
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		return udpResult{}, fmt.Errorf("pinning the sender to CPU %d: %w", generatorCPU(), err)
	}
	defer unix.SchedSetaffinity(0, &all)
	payload := make([]byte, c.Payload)
	msgs := make([]ipv4.Message, udpBatch)
	for i := range msgs {
		msgs[i].Buffers = [][]byte{payload}
	}
	var res udpResult
	start := time.Now()
	next := 0 // the next flow of the set
	for {
		now := time.Since(start)
		if now >= d {
			res.elapsed = now
			return res, nil
		}
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		base := 0
		if c.Rotate > 0 && (now/c.Rotate)%2 == 1 {
			base = c.Flows
		}
		for i := range msgs {
			msgs[i].Addr = dsts[base+next]
			if next++; next == c.Flows {
				next = 0
			}
		}
		n, err := pc.WriteBatch(msgs, 0)
		if n > 0 {
			res.sent += uint64(n)
		}
		// A full device queue is back pressure, not a failure.
		if err != nil && !errors.Is(err, syscall.ENOBUFS) && !errors.Is(err, syscall.EAGAIN) {
			return res, fmt.Errorf("sending datagrams: %w", err)
		}
	}
}

// generatorCPU is the CPU the UDP generator's thread runs on: the last.
func generatorCPU() int { return runtime.NumCPU() - 1 }

// sink counts and drops, in the server pod's namespace, every datagram
// from the client to the generator's ports, at prerouting: the pod
// receives them without a socket per port, and sends no ICMP
// port-unreachable back.
type sink struct{ ns string }

func installSink(ctx context.Context, ns string, src netip.Addr) (*sink, error) {
	ruleset := fmt.Sprintf("table inet kzn_sink {\n  chain pre {\n    type filter hook prerouting priority -300; policy accept;\n    ip saddr %s udp dport %d-%d counter drop\n  }\n}\n",
		src, udpFirstPort, udpFirstPort+udpPorts-1)
	if _, err := testnet.Exec(ctx, ns, "sh", "-c", "nft -f - <<'EOF'\n"+ruleset+"EOF\n"); err != nil {
		return nil, fmt.Errorf("installing the datagram sink: %w", err)
	}
	return &sink{ns: ns}, nil
}

// read returns the datagrams the sink has counted.
func (s *sink) read(ctx context.Context) (uint64, error) {
	out, err := testnet.Exec(ctx, s.ns, "nft", "-j", "list", "table", "inet", "kzn_sink")
	if err != nil {
		return 0, err
	}
	var doc struct {
		Nftables []struct {
			Rule *struct {
				Expr []map[string]json.RawMessage `json:"expr"`
			} `json:"rule"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return 0, fmt.Errorf("parsing nft output: %w", err)
	}
	for _, o := range doc.Nftables {
		if o.Rule == nil {
			continue
		}
		for _, e := range o.Rule.Expr {
			if raw, ok := e["counter"]; ok {
				var cv struct{ Packets uint64 }
				if err := json.Unmarshal(raw, &cv); err != nil {
					return 0, fmt.Errorf("parsing nft counter: %w", err)
				}
				return cv.Packets, nil
			}
		}
	}
	return 0, errors.New("the datagram sink has no counter")
}
