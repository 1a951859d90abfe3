package resolve

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func TestParseStaticEndpoints(t *testing.T) {
	got, err := ParseStaticEndpoints(strings.NewReader(staticFile))
	if err != nil {
		t.Fatal(err)
	}
	want := []StaticEndpoint{
		{Name: "orders-db", Zone: "z-a", Region: "r-1", CIDRs: prefixes("10.50.0.0/16"), Line: 3},
		{Name: "orders-db-replica", Zone: "z-b", CIDRs: prefixes("10.50.7.0/24"), Line: 7},
		{Name: "onprem", Zone: "dc-1", Region: "onprem", CIDRs: prefixes("2001:db8:100::/48", "192.0.2.10/32"), Line: 11},
		{Name: "nat", Zone: "z-a", Region: "r-1", CIDRs: prefixes("203.0.113.0/24"), Line: 15},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n%+v\nwant\n%+v", got, want)
	}
}

func TestParseStaticEndpointsForms(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []StaticEndpoint
	}{
		{"empty file", "", nil},
		{"comments only", "# nothing yet\n", nil},
		{"null list", "endpoints:\n", nil},
		{"empty list", "endpoints: []\n", nil},
		{"JSON", `{"endpoints":[{"name":"a","zone":"z","cidrs":["fd00::1"]}]}`,
			[]StaticEndpoint{{Name: "a", Zone: "z", CIDRs: prefixes("fd00::1/128"), Line: 1}}},
		{"IPv4-mapped prefix becomes IPv4", "endpoints:\n- name: a\n  zone: z\n  cidrs: ['::ffff:10.0.0.0/104']\n",
			[]StaticEndpoint{{Name: "a", Zone: "z", CIDRs: prefixes("10.0.0.0/8"), Line: 2}}},
		{"numeric name", "endpoints:\n- {name: 42, zone: 1a, cidrs: [0.0.0.0/0]}\n",
			[]StaticEndpoint{{Name: "42", Zone: "1a", CIDRs: prefixes("0.0.0.0/0"), Line: 2}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseStaticEndpoints(strings.NewReader(tc.in))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestParseStaticEndpointsErrors(t *testing.T) {
	entry := func(rest string) string {
		return "endpoints:\n  - name: a\n    zone: z\n    cidrs: [10.0.0.0/8]\n" + rest
	}
	for _, tc := range []struct {
		name, in, want string
	}{
		{"not YAML", "endpoints: [", "parsing static endpoints YAML: yaml: line 1: did not find expected node content"},
		{"top-level list", "- name: a\n", "static endpoints: line 1: expected a mapping with the key \"endpoints\""},
		{"unknown top key", "endpoint:\n  - name: a\n", `static endpoints: line 1: unknown key "endpoint" (want "endpoints")`},
		{"endpoints not a list", "endpoints: {name: a}\n", `static endpoints: line 1: "endpoints" must be a list`},
		{"entry not a mapping", "endpoints:\n  - 10.0.0.0/8\n", "static endpoints: entry 1 (line 2): expected a mapping with name, zone, region and cidrs"},
		{"missing name", "endpoints:\n  - zone: z\n    cidrs: [10.0.0.0/8]\n", "static endpoints: entry 1 (line 2): name must not be empty"},
		{"missing zone", entry("  - name: b\n    cidrs: [10.1.0.0/16]\n"), "static endpoints: entry 2 (line 5): zone must not be empty"},
		{"reserved zone", entry("  - name: b\n    zone: unknown\n    cidrs: [10.1.0.0/16]\n"), `static endpoints: entry 2 (line 5): zone "unknown" is reserved`},
		{"reserved region", entry("  - name: b\n    zone: z\n    region: external\n    cidrs: [10.1.0.0/16]\n"), `static endpoints: entry 2 (line 5): region "external" is reserved`},
		{"no cidrs", entry("  - name: b\n    zone: z\n"), "static endpoints: entry 2 (line 5): cidrs must list at least one CIDR"},
		{"empty cidrs", entry("  - name: b\n    zone: z\n    cidrs: []\n"), "static endpoints: entry 2 (line 5): cidrs must list at least one CIDR"},
		{"cidrs not a list", entry("  - name: b\n    zone: z\n    cidrs: 10.1.0.0/16\n"), "static endpoints: entry 2 (line 5): line 7: cidrs must be a list"},
		{"bad cidr", entry("  - name: b\n    zone: z\n    cidrs:\n      - 10.1.0.0/16\n      - 10.300.0.0/16\n"),
			`static endpoints: entry 2 (line 5): line 9: invalid cidr "10.300.0.0/16": netip.ParsePrefix("10.300.0.0/16"): ParseAddr("10.300.0.0"): IPv4 field has value >255`},
		{"host bits", entry("  - name: b\n    zone: z\n    cidrs: [10.1.2.3/16]\n"),
			`static endpoints: entry 2 (line 5): line 7: invalid cidr "10.1.2.3/16": host bits set (did you mean 10.1.0.0/16?)`},
		{"address with zone", entry("  - name: b\n    zone: z\n    cidrs: ['fe80::1%eth0']\n"),
			`static endpoints: entry 2 (line 5): line 7: invalid cidr "fe80::1%eth0": not a prefix or an address`},
		{"short mapped prefix", entry("  - name: b\n    zone: z\n    cidrs: ['::ffff:0:0/90']\n"),
			`static endpoints: entry 2 (line 5): line 7: invalid cidr "::ffff:0:0/90": an IPv4-mapped prefix needs at least 96 bits`},
		{"duplicate name", entry("  - name: a\n    zone: z\n    cidrs: [10.1.0.0/16]\n"), `static endpoints: entry 2 (line 5): name "a" already used by entry 1`},
		{"cidr in two entries", entry("  - name: b\n    zone: z\n    cidrs: [10.0.0.0/8]\n"), "static endpoints: entry 2 (line 5): cidr 10.0.0.0/8 already listed by entry 1"},
		{"cidr twice in one entry", entry("  - name: b\n    zone: z\n    cidrs: [10.1.0.0/16, 10.1.0.0/16]\n"), "static endpoints: entry 2 (line 5): line 7: cidr 10.1.0.0/16 listed twice"},
		{"unknown entry key", entry("  - name: b\n    zone: z\n    cidr: [10.1.0.0/16]\n"), `static endpoints: entry 2 (line 5): line 7: unknown key "cidr" (want name, zone, region, cidrs)`},
		{"key twice", entry("  - name: b\n    zone: z\n    zone: y\n"), `static endpoints: entry 2 (line 5): line 7: key "zone" given twice`},
		{"name not a string", entry("  - name: [b]\n    zone: z\n"), "static endpoints: entry 2 (line 5): line 5: name must be a string"},
		{"alias", "endpoints:\n  - &e {name: a, zone: z, cidrs: [10.0.0.0/8]}\n  - *e\n", "static endpoints: line 2: YAML anchors and aliases are not supported"},
		{"two documents", "endpoints: []\n---\nendpoints: []\n", "static endpoints: line 2: expected one YAML document"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseStaticEndpoints(strings.NewReader(tc.in))
			if err == nil {
				t.Fatalf("no error, got %+v", got)
			}
			if !strings.HasPrefix(err.Error(), tc.want) {
				t.Errorf("error\n  %v\nwant it to start with\n  %s", err, tc.want)
			}
		})
	}
}

func TestParseStaticEndpointsTooLarge(t *testing.T) {
	_, err := ParseStaticEndpoints(strings.NewReader(strings.Repeat("#", maxStaticFileSize+1)))
	if err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("error = %v, want a size error", err)
	}
}

func TestStaticLongestPrefix(t *testing.T) {
	tbl := newStaticTable([]StaticEndpoint{
		{Name: "all", Zone: "z0", CIDRs: prefixes("0.0.0.0/0", "::/0")},
		{Name: "ten", Zone: "z1", CIDRs: prefixes("10.0.0.0/8")},
		{Name: "ten-one", Zone: "z2", CIDRs: prefixes("10.1.0.0/16", "fd00:1::/32")},
		{Name: "host", Zone: "z3", CIDRs: prefixes("10.1.2.3/32")},
	})
	for ip, want := range map[string]string{
		"10.1.2.3": "host", "10.1.2.4": "ten-one", "10.2.0.1": "ten", "11.0.0.1": "all",
		"fd00:1::9": "ten-one", "fd00:2::9": "all",
	} {
		ep := tbl.lookup(netip.MustParseAddr(ip))
		if ep == nil || ep.Workload != want || ep.Kind != KindStatic || ep.WorkloadKind != "Static" {
			t.Errorf("%s: got %+v, want static %q", ip, ep, want)
		}
	}
	if ep := newStaticTable(nil).lookup(netip.MustParseAddr("10.0.0.1")); ep != nil {
		t.Errorf("empty table matched: %+v", ep)
	}
}

// FuzzParseStaticEndpoints checks that no input panics, that accepted files
// obey the documented rules, and that what was accepted builds a table that
// finds every listed prefix's own address.
func FuzzParseStaticEndpoints(f *testing.F) {
	f.Add(staticFile)
	f.Add("")
	f.Add("endpoints:\n  - {name: a, zone: z, cidrs: [10.0.0.0/8, 'fd00::/8', 1.2.3.4]}\n")
	f.Add("endpoints:\n  - &e {name: a}\n  - *e\n")
	f.Add(`{"endpoints":[{"name":"a","zone":"z","region":"r","cidrs":["::ffff:10.0.0.0/104"]}]}`)
	f.Add("endpoints:\n  - name: a\n    zone: z\n    cidrs: [10.1.2.3/16]\n")
	f.Fuzz(func(t *testing.T, in string) {
		eps, err := ParseStaticEndpoints(strings.NewReader(in))
		if err != nil {
			if eps != nil {
				t.Fatalf("error %v with non-nil result", err)
			}
			return
		}
		names := map[string]bool{}
		seen := map[netip.Prefix]bool{}
		for _, e := range eps {
			if e.Name == "" || e.Zone == "" || reserved(e.Zone) || reserved(e.Region) || len(e.CIDRs) == 0 || names[e.Name] {
				t.Fatalf("accepted invalid entry %+v", e)
			}
			names[e.Name] = true
			for _, p := range e.CIDRs {
				if !p.IsValid() || p.Masked() != p || p.Addr().Is4In6() || p.Addr().Zone() != "" || seen[p] {
					t.Fatalf("accepted invalid cidr %v in %+v", p, e)
				}
				seen[p] = true
			}
		}
		tbl := newStaticTable(eps)
		for _, e := range eps {
			for _, p := range e.CIDRs {
				if tbl.lookup(p.Addr()) == nil {
					t.Fatalf("lookup of %v (listed by %q) found nothing", p.Addr(), e.Name)
				}
			}
		}
	})
}

func prefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}
