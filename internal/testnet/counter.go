package testnet

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
)

// Counter is an nftables counter in a node's POSTROUTING hook that counts
// packets whose source is in a set of prefixes: an independent reference
// for the datapath's own counts. nftables counts skbs and skb->len, so it
// agrees with the datapath exactly only when offloads are off.
type Counter struct {
	ns string
}

// Bytes and packets of a Counter.
type CounterValue struct {
	Bytes, Packets uint64
}

// InstallCounter adds table inet kzn_ref to ns, counting sources in
// prefixes at the given hook priority.
func InstallCounter(ctx context.Context, ns string, priority int, prefixes []netip.Prefix) (*Counter, error) {
	return InstallCounterMatch(ctx, ns, priority, prefixes, "")
}

// InstallCounterMatch is InstallCounter with an extra nftables match on
// every rule (e.g. "meta l4proto { tcp, udp }").
func InstallCounterMatch(ctx context.Context, ns string, priority int, prefixes []netip.Prefix, match string) (*Counter, error) {
	var v4, v6 []string
	for _, p := range prefixes {
		if p.Addr().Is4() {
			v4 = append(v4, p.String())
		} else {
			v6 = append(v6, p.String())
		}
	}
	var rules strings.Builder
	if len(v4) > 0 {
		fmt.Fprintf(&rules, "    ip saddr { %s } %s counter\n", strings.Join(v4, ", "), match)
	}
	if len(v6) > 0 {
		fmt.Fprintf(&rules, "    ip6 saddr { %s } %s counter\n", strings.Join(v6, ", "), match)
	}
	ruleset := fmt.Sprintf("table inet kzn_ref {\n  chain post {\n    type filter hook postrouting priority %d; policy accept;\n%s  }\n}\n", priority, rules.String())
	if _, err := Exec(ctx, ns, "sh", "-c", "nft -f - <<'EOF'\n"+ruleset+"EOF\n"); err != nil {
		return nil, fmt.Errorf("installing nftables counter: %w", err)
	}
	return &Counter{ns: ns}, nil
}

// Read returns the sum of the counter's rules.
func (c *Counter) Read(ctx context.Context) (CounterValue, error) {
	rules, err := nftCounters(ctx, c.ns, "kzn_ref")
	if err != nil {
		return CounterValue{}, err
	}
	var v CounterValue
	for _, r := range rules {
		v.Bytes += r.Bytes
		v.Packets += r.Packets
	}
	return v, nil
}

// nftCounter is the counter of one rule and the rule's comment.
type nftCounter struct {
	Comment        string
	Bytes, Packets uint64
}

// nftCounters lists the counters of the rules of table inet name in ns.
func nftCounters(ctx context.Context, ns, table string) ([]nftCounter, error) {
	out, err := Exec(ctx, ns, "nft", "-j", "list", "table", "inet", table)
	if err != nil {
		return nil, err
	}
	var doc struct {
		Nftables []struct {
			Rule *struct {
				Comment string                       `json:"comment"`
				Expr    []map[string]json.RawMessage `json:"expr"`
			} `json:"rule"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return nil, fmt.Errorf("parsing nft output: %w", err)
	}
	var res []nftCounter
	for _, o := range doc.Nftables {
		if o.Rule == nil {
			continue
		}
		for _, e := range o.Rule.Expr {
			raw, ok := e["counter"]
			if !ok {
				continue
			}
			var cv struct{ Packets, Bytes uint64 }
			if err := json.Unmarshal(raw, &cv); err != nil {
				return nil, fmt.Errorf("parsing nft counter: %w", err)
			}
			res = append(res, nftCounter{Comment: o.Rule.Comment, Bytes: cv.Bytes, Packets: cv.Packets})
		}
	}
	return res, nil
}
