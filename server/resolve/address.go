package resolve

import (
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
)

// normalize turns an address into the form the index uses: IPv4-mapped IPv6
// addresses become IPv4 (agents may report either for the same socket), and
// IPv6 zones are dropped (a zone names a link, not a different host).
func normalize(ip netip.Addr) netip.Addr {
	ip = ip.Unmap()
	if ip.Zone() != "" {
		ip = ip.WithZone("")
	}
	return ip
}

// nonPublic lists special-purpose ranges that netip's predicates do not
// cover but that never lead to the internet: shared address space (often a
// pod or service range), IETF protocol assignments, documentation and
// benchmarking ranges, and the reserved class E.
var (
	nonPublic4 = []netip.Prefix{
		netip.MustParsePrefix("100.64.0.0/10"),
		netip.MustParsePrefix("192.0.0.0/24"),
		netip.MustParsePrefix("192.0.2.0/24"),
		netip.MustParsePrefix("198.18.0.0/15"),
		netip.MustParsePrefix("198.51.100.0/24"),
		netip.MustParsePrefix("203.0.113.0/24"),
		netip.MustParsePrefix("240.0.0.0/4"),
	}
	nonPublic6 = []netip.Prefix{
		netip.MustParsePrefix("2001:db8::/32"),
	}
)

// isPublic reports whether an unclaimed address is on the internet. Private
// (RFC 1918, fc00::/7), loopback, link-local, multicast and the ranges
// above are not; such an unclaimed address is "unknown", never "external".
func isPublic(ip netip.Addr) bool {
	if !ip.IsGlobalUnicast() || ip.IsPrivate() {
		return false
	}
	nonPublic := nonPublic6
	if ip.Is4() {
		nonPublic = nonPublic4
	}
	for _, p := range nonPublic {
		if p.Contains(ip) {
			return false
		}
	}
	return true
}

// podAddrs returns a pod's addresses (all families), normalized and
// without duplicates; status.podIP is used when status.podIPs is empty.
func podAddrs(p *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	add := func(s string) {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return
		}
		if ip = normalize(ip); ip.IsValid() && !ip.IsUnspecified() && !slices.Contains(out, ip) {
			out = append(out, ip)
		}
	}
	for _, a := range p.Status.PodIPs {
		add(a.IP)
	}
	if len(out) == 0 && p.Status.PodIP != "" {
		add(p.Status.PodIP)
	}
	return out
}

// firstLabel returns the value of the first of keys present in labels.
func firstLabel(labels map[string]string, keys ...string) string {
	for _, k := range keys {
		if v := labels[k]; v != "" {
			return v
		}
	}
	return ""
}
