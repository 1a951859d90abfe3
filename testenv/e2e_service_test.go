package testenv

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/flow"
	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// serviceClient is a pod sending to a Service, and its workload label.
type serviceClient struct {
	p        *testnet.Pod
	workload string
}

// TestEndToEndServices checks the Service series against nftables
// counters, to the byte: clients in zones a, b and c send to the
// catalog-legacy Service (no trafficDistribution: kube-proxy picks either
// endpoint, zone a or zone b, per connection) through real conntrack DNAT,
// over TCP and UDP, IPv4 and IPv6. Bytes from zone a to the zone-b
// endpoint and from zone b to the zone-a endpoint are avoidable; zone c
// has no endpoint, so its crossing is not. Then the zone-a endpoint turns
// not ready: from the moment the server sees it, zone a's bytes to zone b
// are no longer avoidable. The catalog Service (PreferSameZone) keeps a
// zone-b client in its zone.
func TestEndToEndServices(t *testing.T) {
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	env, bin, agentLinks := startNetworkEnv(ctx, t, EnvOptions{Spec: DefaultSpec(), Network: true})
	stack, err := StartStack(ctx, env, StackOptions{Bin: bin})
	if err != nil {
		t.Fatal(err)
	}
	e := newE2E(ctx, t, env, stack, agentLinks)
	pod := e.slot
	api, _ := pod("shop/api", "node-a1")
	db, _ := pod("shop/db", "node-b1")
	web, _ := pod("shop/web", "node-c1")
	cache, _ := pod("shop/cache", "node-a2")
	debug, _ := pod("default/debug", "node-b2")
	catA, catAName := pod("shop/catalog", "node-a2")
	catB, _ := pod("shop/catalog", "node-b2")
	clients := []serviceClient{{api, "api"}, {db, "db"}, {web, "web"}}
	endpoints := []*testnet.Pod{catA, catB}
	legacy := env.Cluster.ServiceVIPs("shop/catalog-legacy")
	local := env.Cluster.ServiceVIPs("shop/catalog")
	if len(legacy) != 2 || len(local) != 2 {
		t.Fatalf("cluster IPs: catalog-legacy %v, catalog %v; want one per family", legacy, local)
	}
	for _, c := range append([]*testnet.Pod{debug}, api, db, web) {
		for _, ep := range endpoints {
			for _, fam := range [][2]netip.Addr{{c.IPv4, ep.IPv4}, {c.IPv6, ep.IPv6}} {
				for _, p := range []testnet.Pair{{Src: fam[0], Dst: fam[1]}, {Src: fam[1], Dst: fam[0]}} {
					if !e.watched(p) {
						if err := e.ref.Watch(ctx, e.nodeNS[p.Src], p); err != nil {
							t.Fatal(err)
						}
					}
				}
			}
		}
	}
	// send sends n bytes from c to every virtual address of vips, over
	// TCP (port 80 -> 8080) and UDP (53 -> 5353), conns times each, and
	// returns the endpoints chosen.
	send := func(c *testnet.Pod, vips []netip.Addr, udp bool, conns, n int) map[netip.Addr]int {
		t.Helper()
		chosen := map[netip.Addr]int{}
		for _, vip := range vips {
			protos := []string{"tcp"}
			if udp {
				protos = append(protos, "udp")
			}
			for _, proto := range protos {
				port, target := uint16(80), uint16(8080)
				if proto == "udp" {
					port, target = 53, 5353
				}
				eps := map[netip.AddrPort]string{}
				for _, ep := range endpoints {
					a := ep.IPv4
					if vip.Is6() {
						a = ep.IPv6
					}
					eps[netip.AddrPortFrom(a, target)] = ep.NS
					if proto == "tcp" {
						e.receivers[ep.NS] = true
					}
				}
				for range conns {
					got, err := testnet.TransferToService(ctx, proto, c.NS, netip.AddrPortFrom(vip, port), eps, n)
					if err != nil {
						t.Fatal(err)
					}
					chosen[got.Addr()]++
				}
			}
		}
		return chosen
	}
	zoneOf := func(a netip.Addr) string {
		for _, p := range []*testnet.Pod{api, db, web, debug, catA, catB} {
			if a == p.IPv4 || a == p.IPv6 {
				return p.Node.Zone
			}
		}
		t.Fatalf("no pod at %s", a)
		return ""
	}
	// expectations sums, per Service series, the reference's counts of
	// the clients' pairs to the endpoints, minus base (an earlier read).
	type key struct{ service, workload, src, dst, avoidable string }
	sums := func(ref, base map[testnet.Pair]flow.Counts, service string, avoidable func(src, dst string) bool, cs ...serviceClient) map[key]flow.Counts {
		out := map[key]flow.Counts{}
		for _, c := range cs {
			for _, ep := range endpoints {
				for _, p := range []testnet.Pair{{Src: c.p.IPv4, Dst: ep.IPv4}, {Src: c.p.IPv6, Dst: ep.IPv6}} {
					cnt := ref[p]
					cnt.Bytes -= base[p].Bytes
					cnt.Packets -= base[p].Packets
					if cnt.IsZero() {
						continue
					}
					src, dst := zoneOf(p.Src), zoneOf(p.Dst)
					k := key{service, c.workload, src, dst, fmt.Sprint(avoidable(src, dst))}
					s := out[k]
					s.Add(cnt)
					out[k] = s
				}
			}
		}
		return out
	}
	expects := func(want map[key]flow.Counts) []expect {
		var exps []expect
		for k, c := range want {
			sel := fmt.Sprintf(`{service=%q,src_workload=%q,src_zone=%q,dst_zone=%q,avoidable=%q}`, k.service, k.workload, k.src, k.dst, k.avoidable)
			exps = append(exps,
				expect{"bytes " + sel, "sum(kubezonnet_service_bytes_total" + sel + ")", float64(c.Bytes)},
				expect{"packets " + sel, "sum(kubezonnet_service_packets_total" + sel + ")", float64(c.Packets)})
		}
		sort.Slice(exps, func(i, j int) bool { return exps[i].what < exps[j].what })
		return exps
	}
	withEndpoint := map[string]bool{"zone-a": true, "zone-b": true}

	// Phase 1: both endpoints ready.
	for _, c := range clients {
		send(c.p, legacy, true, 4, 20_000)
	}
	if chosen := send(debug, local, false, 4, 10_000); chosen[catB.IPv4]+chosen[catB.IPv6] != 8 {
		t.Fatalf("PreferSameZone from zone b reached %v, want catalog's zone-b endpoint only", chosen)
	}
	ref1 := e.readRef()
	want1 := sums(ref1, nil, "catalog-legacy", func(src, dst string) bool { return src != dst && withEndpoint[src] }, clients...)
	for k, c := range sums(ref1, nil, "catalog", func(string, string) bool { return false }, serviceClient{debug, "debug"}) {
		want1[k] = c
	}
	// Sixteen connections per client pick an endpoint at random: each
	// kind of series below exists but for a chance of 2^-16.
	for _, k := range []key{
		{"catalog-legacy", "api", "zone-a", "zone-b", "true"}, {"catalog-legacy", "db", "zone-b", "zone-a", "true"},
		{"catalog-legacy", "api", "zone-a", "zone-a", "false"}, {"catalog-legacy", "web", "zone-c", "zone-b", "false"},
		{"catalog", "debug", "zone-b", "zone-b", "false"},
	} {
		if want1[k].IsZero() {
			t.Fatalf("no traffic for %+v: the test would prove nothing about it", k)
		}
	}
	t.Run("Service bytes by zone pair and avoidability equal the traffic", func(t *testing.T) {
		e.settle(expects(want1))
		// Replies carry no Service: the catalog pods send to nobody's
		// virtual address.
		if n := e.value(`count(kubezonnet_service_bytes_total{src_workload="catalog"})`, time.Time{}); n != 0 {
			t.Errorf("%v Service series of the endpoints' replies, want none", n)
		}
	})

	// Phase 2: the zone-a endpoint turns not ready; kube-proxy sends
	// every new connection to zone b. The cache pod (zone a) probes until
	// the server shows a crossing from zone a as unavoidable: the server
	// has seen the change, and every later batch is judged by it.
	if err := env.Cluster.SetEndpointReady(ctx, "shop/catalog-legacy", catAName, false); err != nil {
		t.Fatal(err)
	}
	eps := map[netip.AddrPort]string{netip.AddrPortFrom(catA.IPv4, 8080): catA.NS, netip.AddrPortFrom(catB.IPv4, 8080): catB.NS}
	waitFor(t, time.Minute, "the server to see the zone-a endpoint not ready", func() (bool, error) {
		if _, err := testnet.TransferToService(ctx, "tcp", cache.NS, netip.AddrPortFrom(legacy[0], 80), eps, 1000); err != nil {
			return false, err
		}
		res, err := stack.Query(ctx, `count(kubezonnet_service_bytes_total{service="catalog-legacy",src_workload="cache",src_zone="zone-a",dst_zone="zone-b",avoidable="false"})`)
		return err == nil && len(res) == 1 && res[0].Value == 1, err
	})
	e.receivers[catB.NS] = true
	if chosen := send(api, legacy, true, 4, 20_000); chosen[catA.IPv4]+chosen[catA.IPv6] != 0 {
		t.Fatalf("connections reached the not-ready endpoint: %v", chosen)
	}
	ref2 := e.readRef()
	t.Run("an endpoint turning not ready makes crossing unavoidable from then on", func(t *testing.T) {
		want := map[key]flow.Counts{}
		for k, c := range want1 {
			want[k] = c
		}
		for k, c := range sums(ref2, ref1, "catalog-legacy", func(src, dst string) bool { return false }, clients[0]) {
			s := want[k]
			s.Add(c)
			want[k] = s
		}
		e.settle(expects(want))
	})
}
