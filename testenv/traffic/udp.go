package traffic

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"runtime"
	"time"

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

// sendUDP sends c.Payload-byte datagrams from the client pod to the
// server pod as fast as one socket can, for d: to c.Flows destination
// ports round robin, the set moving to fresh ports every c.Rotate. The
// generator runs as a process of its own (see Generator), its sending
// thread on the last CPU: the datagrams' way through the namespaces runs
// in its softirqs on that CPU, so every run sees the same placement, not
// whatever the scheduler chose.
func (b *bench) sendUDP(ctx context.Context, w *world, c Case, d time.Duration) (GeneratorResult, error) {
	g := Generator{
		NS:        w.client.NS,
		Src:       netip.AddrPortFrom(w.client.IPv4, udpSourcePort),
		Dst:       w.server.IPv4,
		FirstPort: udpFirstPort,
		Flows:     c.Flows,
		Rotate:    c.Rotate,
		Payload:   c.Payload,
		Duration:  d,
		CPU:       generatorCPU(),
	}
	if g.ports() > udpPorts {
		return GeneratorResult{}, fmt.Errorf("%d flows do not fit the generator's %d ports", c.Flows, udpPorts)
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, b.udpgen, g.Args()...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return GeneratorResult{}, fmt.Errorf("UDP generator: %w: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	var res GeneratorResult
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		return GeneratorResult{}, fmt.Errorf("UDP generator: reading its result %q: %w", bytes.TrimSpace(stdout.Bytes()), err)
	}
	return res, nil
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
