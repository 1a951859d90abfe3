package resolve

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

// StaticEndpoint is one entry of the static endpoints file: address ranges
// outside the cluster (managed databases, on-prem networks, NAT gateways)
// whose zone the user knows, so traffic to them is classified too.
type StaticEndpoint struct {
	// Name is the workload label value of addresses in CIDRs.
	Name string
	// Zone is required: an entry without a zone could only ever be "unknown".
	Zone string
	// Region is optional; without it a cross-zone flow is never cross-region.
	Region string
	// CIDRs are masked prefixes; a bare address is a /32 or /128.
	CIDRs []netip.Prefix
	// Line is where the entry starts in the file, for messages.
	Line int
}

// maxStaticFileSize bounds what ParseStaticEndpoints reads, so a wrong path
// (a disk image, /dev/zero) fails with a message instead of eating memory.
const maxStaticFileSize = 16 << 20

// ParseStaticEndpoints reads the static endpoints file. The format is YAML
// (JSON works too, being YAML):
//
//	# addresses outside the cluster whose location we know
//	endpoints:
//	  - name: orders-db          # workload label value (required, unique)
//	    zone: us-east-1a         # required
//	    region: us-east-1        # optional
//	    cidrs:                   # at least one; IPv4 or IPv6; a bare address is /32 or /128
//	      - 10.50.0.0/24
//	      - fd12:3456::/48
//
// Unknown keys, duplicate names, a CIDR listed twice, host bits set in a
// CIDR, the reserved zones "unknown" and "external", and YAML anchors are
// errors. Every error names the entry (1-based) and its line.
func ParseStaticEndpoints(r io.Reader) ([]StaticEndpoint, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxStaticFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("reading static endpoints: %w", err)
	}
	if len(data) > maxStaticFileSize {
		return nil, fmt.Errorf("static endpoints file is larger than %d bytes", maxStaticFileSize)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) { // empty file: no endpoints
			return nil, nil
		}
		return nil, fmt.Errorf("parsing static endpoints YAML: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return nil, fmt.Errorf("static endpoints: line %d: expected one YAML document", extra.Line)
	} else if !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("parsing static endpoints YAML: %w", err)
	}
	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) != 1 {
			return nil, fmt.Errorf("static endpoints: line %d: expected one YAML document", root.Line)
		}
		root = root.Content[0]
	}
	if err := noAlias(root); err != nil {
		return nil, err
	}
	if isNull(root) {
		return nil, nil
	}
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("static endpoints: line %d: expected a mapping with the key \"endpoints\"", root.Line)
	}
	var list *yaml.Node
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		if k.Value != "endpoints" {
			return nil, fmt.Errorf("static endpoints: line %d: unknown key %q (want \"endpoints\")", k.Line, k.Value)
		}
		if list != nil {
			return nil, fmt.Errorf("static endpoints: line %d: key \"endpoints\" given twice", k.Line)
		}
		list = v
	}
	if list == nil || isNull(list) {
		return nil, nil
	}
	if list.Kind != yaml.SequenceNode {
		return nil, fmt.Errorf("static endpoints: line %d: \"endpoints\" must be a list", list.Line)
	}

	if len(list.Content) == 0 {
		return nil, nil
	}
	out := make([]StaticEndpoint, 0, len(list.Content))
	names := make(map[string]int, len(list.Content))
	cidrs := make(map[netip.Prefix]int)
	for i, item := range list.Content {
		n := i + 1
		se, err := parseEntry(item)
		if err != nil {
			return nil, fmt.Errorf("static endpoints: entry %d (line %d): %w", n, item.Line, err)
		}
		if prev, dup := names[se.Name]; dup {
			return nil, fmt.Errorf("static endpoints: entry %d (line %d): name %q already used by entry %d", n, item.Line, se.Name, prev)
		}
		names[se.Name] = n
		for _, p := range se.CIDRs {
			if prev, dup := cidrs[p]; dup {
				return nil, fmt.Errorf("static endpoints: entry %d (line %d): cidr %s already listed by entry %d", n, item.Line, p, prev)
			}
			cidrs[p] = n
		}
		out = append(out, se)
	}
	return out, nil
}

// parseEntry validates one list item; the caller adds entry and line.
func parseEntry(item *yaml.Node) (StaticEndpoint, error) {
	se := StaticEndpoint{Line: item.Line}
	if item.Kind != yaml.MappingNode {
		return se, errors.New("expected a mapping with name, zone, region and cidrs")
	}
	seen := make(map[string]bool, 4)
	var cidrNode *yaml.Node
	for i := 0; i+1 < len(item.Content); i += 2 {
		k, v := item.Content[i], item.Content[i+1]
		if seen[k.Value] {
			return se, fmt.Errorf("line %d: key %q given twice", k.Line, k.Value)
		}
		seen[k.Value] = true
		switch k.Value {
		case "name", "zone", "region":
			if v.Kind != yaml.ScalarNode || isNull(v) {
				return se, fmt.Errorf("line %d: %s must be a string", v.Line, k.Value)
			}
			s := strings.TrimSpace(v.Value)
			switch k.Value {
			case "name":
				se.Name = s
			case "zone":
				se.Zone = s
			default:
				se.Region = s
			}
		case "cidrs":
			cidrNode = v
		default:
			return se, fmt.Errorf("line %d: unknown key %q (want name, zone, region, cidrs)", k.Line, k.Value)
		}
	}
	if se.Name == "" {
		return se, errors.New("name must not be empty")
	}
	if se.Zone == "" {
		return se, errors.New("zone must not be empty")
	}
	if reserved(se.Zone) {
		return se, fmt.Errorf("zone %q is reserved", se.Zone)
	}
	if reserved(se.Region) {
		return se, fmt.Errorf("region %q is reserved", se.Region)
	}
	if cidrNode == nil || isNull(cidrNode) {
		return se, errors.New("cidrs must list at least one CIDR")
	}
	if cidrNode.Kind != yaml.SequenceNode {
		return se, fmt.Errorf("line %d: cidrs must be a list", cidrNode.Line)
	}
	if len(cidrNode.Content) == 0 {
		return se, errors.New("cidrs must list at least one CIDR")
	}
	for _, c := range cidrNode.Content {
		if c.Kind != yaml.ScalarNode {
			return se, fmt.Errorf("line %d: cidr must be a string", c.Line)
		}
		p, err := parseCIDR(c.Value)
		if err != nil {
			return se, fmt.Errorf("line %d: %w", c.Line, err)
		}
		if slices.Contains(se.CIDRs, p) {
			return se, fmt.Errorf("line %d: cidr %s listed twice", c.Line, p)
		}
		se.CIDRs = append(se.CIDRs, p)
	}
	return se, nil
}

// parseCIDR accepts a prefix or a bare address. IPv4-mapped IPv6 prefixes
// are turned into IPv4 ones, because the resolver matches unmapped addresses.
func parseCIDR(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return p, fmt.Errorf("invalid cidr %q: %w", s, err)
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return p, fmt.Errorf("invalid cidr %q: not a prefix or an address", s)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if p.Addr().Is4In6() {
		if p.Bits() < 96 {
			return p, fmt.Errorf("invalid cidr %q: an IPv4-mapped prefix needs at least 96 bits", s)
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	if m := p.Masked(); m != p {
		return p, fmt.Errorf("invalid cidr %q: host bits set (did you mean %s?)", s, m)
	}
	return p, nil
}

// noAlias refuses anchors and aliases: they are never needed in this file,
// and refusing them rules out alias cycles and expansion bombs.
func noAlias(n *yaml.Node) error {
	if n.Kind == yaml.AliasNode || n.Anchor != "" {
		return fmt.Errorf("static endpoints: line %d: YAML anchors and aliases are not supported", n.Line)
	}
	for _, c := range n.Content {
		if err := noAlias(c); err != nil {
			return err
		}
	}
	return nil
}

// isNull reports a YAML null (empty value, "~" or "null").
func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// reserved reports the zone and region values the contract gives other kinds.
func reserved(v string) bool { return v == ValueUnknown || v == ValueExternal }

// staticTable answers longest-prefix matches over the static endpoints: one
// exact-match map per distinct prefix length, tried from the longest length
// down, so a lookup costs one masking and one map probe per length in use.
type staticTable struct {
	v4, v6 []prefixBucket
}

type prefixBucket struct {
	bits int
	eps  map[netip.Prefix]*Endpoint
}

// newStaticTable builds the lookup table; entries were validated by the parser.
func newStaticTable(entries []StaticEndpoint) *staticTable {
	t := &staticTable{}
	for _, se := range entries {
		ep := &Endpoint{Kind: KindStatic, Workload: se.Name, WorkloadKind: WorkloadKindStatic,
			Zone: se.Zone, Region: se.Region}
		for _, p := range se.CIDRs {
			if p.Addr().Is4() {
				t.v4 = addPrefix(t.v4, p, ep)
			} else {
				t.v6 = addPrefix(t.v6, p, ep)
			}
		}
	}
	return t
}

func addPrefix(bs []prefixBucket, p netip.Prefix, ep *Endpoint) []prefixBucket {
	p = p.Masked()
	for i := range bs {
		if bs[i].bits == p.Bits() {
			bs[i].eps[p] = ep
			return bs
		}
	}
	bs = append(bs, prefixBucket{bits: p.Bits(), eps: map[netip.Prefix]*Endpoint{p: ep}})
	slices.SortFunc(bs, func(a, b prefixBucket) int { return b.bits - a.bits }) // longest first
	return bs
}

// lookup returns the endpoint of the longest prefix containing ip, or nil.
// ip must be unmapped and zone-free (the resolver normalizes it).
func (t *staticTable) lookup(ip netip.Addr) *Endpoint {
	bs := t.v6
	if ip.Is4() {
		bs = t.v4
	}
	for i := range bs {
		p, err := ip.Prefix(bs[i].bits)
		if err != nil {
			continue
		}
		if ep, ok := bs[i].eps[p]; ok {
			return ep
		}
	}
	return nil
}
