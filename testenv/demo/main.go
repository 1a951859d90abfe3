// Command demo runs kubezonnet on a simulated three-zone cluster on this
// host: a real kube-apiserver and etcd, network namespaces for six nodes and
// their pods, one real agent per node, the real server (with its own
// least-privilege ServiceAccount) and a real Prometheus receiving the
// server's remote-write. It runs known traffic for about a minute, then
// prints, from Prometheus, who sent what across zones and what it would
// cost. It needs root (namespaces, eBPF) and removes everything it made,
// also on Ctrl-C.
//
// On a terminal the cluster stays up after the report until Ctrl-C, so
// that Prometheus can be queried; without one (or with -wait=false) the
// demo removes everything once the report is printed and exits 0.
// `make demo HOLD=1` passes -wait to keep it up anyway.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/term"

	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
	"github.com/kubezonnet/kubezonnet/testenv"
)

// secondsPerMonth is the month the cost rules (deploy/rules) price:
// 30.4375 days.
const secondsPerMonth = 2629800

// monthlyCost is what bytes sent in elapsed cost in a month at the same
// rate, at pricePerGiB USD per GiB (2^30 bytes, the unit clouds bill).
// It is the recording rule kubezonnet:workload_pair_monthly_cost:usd
// applied to a steady rate; main_test.go checks the two agree through
// promtool.
func monthlyCost(bytes float64, elapsed time.Duration, pricePerGiB float64) float64 {
	return bytes / elapsed.Seconds() * secondsPerMonth / (1 << 30) * pricePerGiB
}

func main() {
	duration := flag.Duration("duration", time.Minute, "how long to run traffic")
	wait := flag.Bool("wait", term.IsTerminal(int(os.Stdin.Fd())), "keep the cluster running after the report until Ctrl-C (default: when stdin is a terminal)")
	bin := flag.String("bin", "", "the kubezonnet binary to run (default: build it from this checkout)")
	flag.Parse()
	if err := run(*duration, *wait, *bin); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) {
	fmt.Printf("==> "+format+"\n", args...)
}

func run(duration time.Duration, wait bool, bin string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (network namespaces and eBPF): run it with sudo")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	spec := testenv.DefaultSpec()
	spec.StaticHosts = []string{"billing-db"}
	step("starting a real kube-apiserver and etcd, and building 3 zones x 2 nodes of network namespaces")
	bins, err := testenv.FindBinaries(ctx, os.Stdout)
	if err != nil {
		return err
	}
	env, err := testenv.StartEnv(ctx, testenv.EnvOptions{Spec: spec, Network: true, ControlPlane: testenv.Options{Binaries: bins}})
	if err != nil {
		return err
	}
	defer func() {
		step("cleaning up: processes, API server, namespaces")
		if err := env.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "demo: cleanup:", err)
		}
	}()

	if bin == "" {
		step("building the kubezonnet binary")
		if bin, err = testutil.BuildKubezonnet(ctx, env.Dir); err != nil {
			return err
		}
	}
	root, err := testutil.RepoRoot()
	if err != nil {
		return err
	}
	billing := env.Topology.Hosts[0]
	step("starting Prometheus, the server and one eBPF agent per node")
	// The server logs the flows it cannot place (class unknown) so that
	// the report can say what they were.
	flowLog := filepath.Join(env.Dir, "flows.log")
	stack, err := testenv.StartStack(ctx, env, testenv.StackOptions{
		Bin:        bin,
		ServerArgs: []string{"--flow-log-classes", "unknown", "--flow-log-file", flowLog},
		RulesFiles: []string{root + "/deploy/rules/kubezonnet.rules.yaml"},
		StaticEndpoints: fmt.Sprintf("endpoints:\n  - name: billing-db\n    zone: zone-c\n    region: %s\n    cidrs: [%s/32, %s/128]\n",
			spec.Region, billing.IPv4, billing.IPv6),
	})
	if err != nil {
		return err
	}

	pod := func(workload, node string) *testnet.Pod {
		p := env.Cluster.PodOn(workload, node)
		if p == nil {
			return nil
		}
		return env.Topology.Pod(p.Name)
	}
	api, db, web := pod("shop/api", "node-a1"), pod("shop/db", "node-b1"), pod("shop/web", "node-c1")
	cache, debug := pod("shop/cache", "node-a2"), pod("default/debug", "node-b2")
	nodeA1 := env.Topology.Node("node-a1")
	if api == nil || db == nil || web == nil || cache == nil || debug == nil || nodeA1 == nil {
		return fmt.Errorf("the default cluster spec changed: a demo pod is missing")
	}
	type job struct {
		what     string
		fromNS   string
		toNS     string
		dst      netip.AddrPort
		bytes    int
		interval int // every n-th round
		// via, for a Service's virtual address dst: its endpoints and
		// their namespaces (kube-proxy's rules on the node pick one).
		via map[netip.AddrPort]string
	}
	catA, catB := pod("shop/catalog", "node-a2"), pod("shop/catalog", "node-b2")
	catalog, legacy := env.Cluster.ServiceVIPs("shop/catalog"), env.Cluster.ServiceVIPs("shop/catalog-legacy")
	if catA == nil || catB == nil || len(catalog) == 0 || len(legacy) == 0 {
		return fmt.Errorf("the default cluster spec changed: the catalog pods or Services are missing")
	}
	catalogEPs := map[netip.AddrPort]string{netip.AddrPortFrom(catA.IPv4, 8080): catA.NS, netip.AddrPortFrom(catB.IPv4, 8080): catB.NS}
	jobs := []job{
		{"db-0 (zone-b) streams rows to api (zone-a)", db.NS, api.NS, netip.AddrPortFrom(api.IPv4, 8080), 2 << 20, 1, nil},
		{"api (zone-a) queries db-0 (zone-b)", api.NS, db.NS, netip.AddrPortFrom(db.IPv4, 5432), 64 << 10, 1, nil},
		{"web (zone-c) calls api (zone-a) over IPv6", web.NS, api.NS, netip.AddrPortFrom(api.IPv6, 8443), 256 << 10, 2, nil},
		{"api (zone-a) reads cache (zone-a)", api.NS, cache.NS, netip.AddrPortFrom(cache.IPv4, 6379), 512 << 10, 1, nil},
		{"node-exporter (host network, node-a1) ships to db-0", nodeA1.NS, db.NS, netip.AddrPortFrom(db.IPv4, 9100), 32 << 10, 3, nil},
		{"debug (zone-b) exports to billing-db (static endpoint, zone-c)", debug.NS, billing.NS, netip.AddrPortFrom(billing.IPv4, 5432), 128 << 10, 2, nil},
		{"api (zone-a) calls Service catalog (PreferSameZone: kept in zone-a)", api.NS, "", netip.AddrPortFrom(catalog[0], 80), 256 << 10, 1, catalogEPs},
		{"api (zone-a) calls Service catalog-legacy (same pods, no trafficDistribution)", api.NS, "", netip.AddrPortFrom(legacy[0], 80), 256 << 10, 1, catalogEPs},
		{"web (zone-c, no catalog pod) calls Service catalog", web.NS, "", netip.AddrPortFrom(catalog[0], 80), 128 << 10, 2, catalogEPs},
	}
	for _, j := range jobs {
		fmt.Printf("    traffic: %s\n", j.what)
	}
	step("running traffic for %s", duration)
	start := time.Now()
	for round := 0; time.Since(start) < duration; round++ {
		for _, j := range jobs {
			if round%j.interval != 0 {
				continue
			}
			var err error
			if j.via != nil {
				_, err = testnet.TransferToService(ctx, "tcp", j.fromNS, j.dst, j.via, j.bytes)
			} else {
				err = testnet.Transfer(ctx, j.fromNS, j.toNS, j.dst, j.bytes)
			}
			if err != nil {
				return fmt.Errorf("%s: %w", j.what, err)
			}
		}
		if round%10 == 0 {
			fmt.Printf("    %3.0fs elapsed\n", time.Since(start).Seconds())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
	elapsed := time.Since(start)
	step("waiting for the last counts to reach Prometheus")
	time.Sleep(6 * time.Second)

	if err := report(ctx, stack, elapsed, flowLog); err != nil {
		return err
	}
	if !wait {
		fmt.Println("\nNo terminal: the cluster is removed as the demo exits. To keep it up and query Prometheus, run `make demo HOLD=1` (or the demo with -wait).")
		return nil
	}
	fmt.Printf("\nPrometheus is at %s (this host only). Queries to try:\n", stack.PrometheusURL)
	for _, q := range []string{
		`sum by (src_zone, dst_zone) (rate(kubezonnet_zone_pair_bytes_total[1m]))`,
		`topk(10, sum by (src_workload, dst_workload) (rate(kubezonnet_pod_pair_bytes_total{class="cross-zone"}[1m])))`,
		`kubezonnet:workload_pair_monthly_cost:usd`,
		`kubezonnet:cross_zone_bytes:ratio_rate5m`,
		`kubezonnet_pod_pair_bytes_total{dst_kind="static"}`,
	} {
		fmt.Println("  ", q)
	}
	step("the cluster keeps running; press Ctrl-C to clean up")
	<-ctx.Done()
	return nil
}

// report prints the zone matrix (and what its unknown row or column was),
// the top cross-zone workload and pod pairs and their monthly cost at the
// run's rate, priced per class with the rules' kubezonnet:price_per_gib.
func report(ctx context.Context, s *testenv.Stack, elapsed time.Duration, flowLog string) error {
	prices := map[string]float64{}
	ps, err := s.Query(ctx, `kubezonnet:price_per_gib`)
	if err != nil {
		return err
	}
	for _, p := range ps {
		prices[p.Labels["class"]] = p.Value
	}
	if len(prices) == 0 {
		return fmt.Errorf("prometheus has no kubezonnet:price_per_gib: are deploy/rules loaded?")
	}
	zones, err := s.Query(ctx, `sum by (src_zone, dst_zone) (kubezonnet_zone_pair_bytes_total)`)
	if err != nil {
		return err
	}
	var names []string
	seen := map[string]bool{}
	cell := map[[2]string]float64{}
	for _, z := range zones {
		src, dst := z.Labels["src_zone"], z.Labels["dst_zone"]
		cell[[2]string{src, dst}] = z.Value
		for _, n := range []string{src, dst} {
			if !seen[n] {
				seen[n] = true
				names = append(names, n)
			}
		}
	}
	sort.Strings(names)
	fmt.Println("\nBytes by zone pair (rows: the sender's zone, columns: the receiver's zone; the diagonal stays in its zone):")
	w := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(w, "\t%s\t\n", strings.Join(names, "\t"))
	for _, src := range names {
		fmt.Fprintf(w, "%s", src)
		for _, dst := range names {
			fmt.Fprintf(w, "\t%s", human(cell[[2]string{src, dst}]))
		}
		fmt.Fprintln(w, "\t")
	}
	w.Flush()
	fmt.Println("zone-a, zone-b, zone-c: the nodes' topology.kubernetes.io/zone; billing-db, a static endpoint, is in zone-c.")
	if seen["external"] {
		fmt.Println("external: public addresses outside the cluster (the internet).")
	}
	if seen["unknown"] {
		if err := explainUnknown(flowLog); err != nil {
			return err
		}
	}

	top := func(title, q string, cols []string) error {
		rows, err := s.Query(ctx, q)
		if err != nil {
			return err
		}
		sort.Slice(rows, func(i, j int) bool { return rows[i].Value > rows[j].Value })
		fmt.Printf("\n%s:\n", title)
		w := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintf(w, "%s\tBYTES\tUSD/MONTH AT THIS RATE\n", strings.ToUpper(strings.Join(cols, "\t")))
		for _, r := range rows {
			var vals []string
			for _, c := range cols {
				vals = append(vals, r.Labels[c])
			}
			fmt.Fprintf(w, "%s\t%s\t%.2f\n", strings.Join(vals, "\t"), human(r.Value), monthlyCost(r.Value, elapsed, prices[r.Labels["class"]]))
		}
		return w.Flush()
	}
	if err := top("Top cross-zone workload pairs",
		`topk(5, sum by (class, src_namespace, src_workload, src_zone, dst_namespace, dst_workload, dst_zone) (kubezonnet_pod_pair_bytes_total{class=~"cross-zone|cross-region"}))`,
		[]string{"src_namespace", "src_workload", "src_zone", "dst_namespace", "dst_workload", "dst_zone"}); err != nil {
		return err
	}
	if err := top("Top cross-zone pod pairs",
		`topk(5, sum by (class, src_pod, src_workload, src_zone, dst_pod, dst_workload, dst_zone) (kubezonnet_pod_pair_bytes_total{class=~"cross-zone|cross-region"}))`,
		[]string{"src_pod", "src_workload", "src_zone", "dst_pod", "dst_workload", "dst_zone"}); err != nil {
		return err
	}
	if err := servicesToFix(ctx, s, elapsed, prices["cross-zone"]); err != nil {
		return err
	}
	fmt.Printf("\nCost: USD per GiB (2^30 bytes) by class, from the recording rules' kubezonnet:price_per_gib (deploy/rules), as the dashboard counts it: cross-zone %.2f, cross-region %.2f, internet %.2f. Bytes are L3 bytes as on the wire, every segment's headers counted.\n",
		prices["cross-zone"], prices["cross-region"], prices["external"])
	return nil
}

// servicesToFix prints, per Service, the bytes its clients sent to
// another zone while a ready endpoint was in their own (avoidable), all
// it sent across zones, and the avoidable bytes' monthly cost at the
// run's rate: the Services to fix first.
func servicesToFix(ctx context.Context, s *testenv.Stack, elapsed time.Duration, price float64) error {
	rows, err := s.Query(ctx, `sum by (service_namespace, service, traffic_distribution, src_zone, dst_zone, avoidable) (kubezonnet_service_bytes_total)`)
	if err != nil {
		return err
	}
	type svc struct {
		name, td                  string
		avoidable, cross, overall float64
	}
	by := map[string]*svc{}
	for _, r := range rows {
		k := r.Labels["service_namespace"] + "/" + r.Labels["service"]
		v := by[k]
		if v == nil {
			v = &svc{name: k, td: r.Labels["traffic_distribution"]}
			by[k] = v
		}
		v.overall += r.Value
		if r.Labels["src_zone"] != r.Labels["dst_zone"] {
			v.cross += r.Value
		}
		if r.Labels["avoidable"] == "true" {
			v.avoidable += r.Value
		}
	}
	list := make([]*svc, 0, len(by))
	for _, v := range by {
		list = append(list, v)
	}
	sort.Slice(list, func(i, j int) bool {
		return list[i].avoidable > list[j].avoidable || list[i].avoidable == list[j].avoidable && list[i].name < list[j].name
	})
	fmt.Println("\nServices to fix first (avoidable: sent to another zone while a ready endpoint was in the client's own):")
	w := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(w, "SERVICE\tTRAFFIC DISTRIBUTION\tAVOIDABLE\tCROSS-ZONE\tALL\tAVOIDABLE USD/MONTH AT THIS RATE")
	for _, v := range list {
		td := v.td
		if td == "" {
			td = "(unset)"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%.2f\n", v.name, td, human(v.avoidable), human(v.cross), human(v.overall), monthlyCost(v.avoidable, elapsed, price))
	}
	if err := w.Flush(); err != nil {
		return err
	}
	fmt.Println("catalog and catalog-legacy front the same pods in zone-a and zone-b: catalog asks for PreferSameZone, so api's calls stay in zone-a; catalog-legacy does not, so about half of them cross. web, in zone-c, has no catalog pod in its zone: its crossing is not avoidable.")
	return nil
}

// explainUnknown says what the matrix's unknown zone was: the addresses
// the server could place nowhere (no pod, node, static endpoint, and not
// public), read from its flow log of class unknown.
func explainUnknown(flowLog string) error {
	f, err := os.Open(flowLog)
	if err != nil {
		return fmt.Errorf("reading the server's flow log to explain the unknown zone: %w", err)
	}
	defer f.Close()
	type key struct{ side, ip string }
	bytes := map[key]uint64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e struct {
			SrcIP   string `json:"src_ip"`
			DstIP   string `json:"dst_ip"`
			SrcZone string `json:"src_zone"`
			DstZone string `json:"dst_zone"`
			Bytes   uint64 `json:"bytes"`
		}
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue // not a flow event
		}
		if e.DstZone == "unknown" {
			bytes[key{"to", e.DstIP}] += e.Bytes
		}
		if e.SrcZone == "unknown" {
			bytes[key{"from", e.SrcIP}] += e.Bytes
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("reading the server's flow log: %w", err)
	}
	fmt.Println("unknown: addresses that are no pod, node or static endpoint of the cluster and not public, so no zone can be named.")
	if len(bytes) == 0 {
		fmt.Println("  (the server's flow log holds none of them yet)")
		return nil
	}
	keys := make([]key, 0, len(bytes))
	for k := range bytes {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		return keys[i].ip < keys[j].ip || keys[i].ip == keys[j].ip && keys[i].side < keys[j].side
	})
	fmt.Println("  Here (from the server's flow log, --flow-log-classes unknown):")
	for _, k := range keys {
		fmt.Printf("  %s %s: %s (%s)\n", k.side, k.ip, human(float64(bytes[k])), addressKind(k.ip))
	}
	return nil
}

// addressKind names the kind of address an unplaceable flow went to.
func addressKind(s string) string {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return "not an address"
	}
	switch {
	case a.IsLinkLocalMulticast() && a.Is6():
		return "IPv6 link-local multicast: neighbour discovery or MLD, sent by the kernel itself"
	case a.IsMulticast():
		return "multicast"
	case a.IsLinkLocalUnicast() && a.Is6():
		return "IPv6 link-local: neighbour discovery between a pod and its node, sent by the kernel; it never leaves the link"
	case a.IsLinkLocalUnicast():
		return "link-local: the node's own link, never routed"
	case a.IsLoopback():
		return "loopback"
	case a.IsPrivate():
		return "a private address no pod, node or static endpoint holds: a deleted pod's, or a network the cluster does not know (name it with --static-endpoints-file)"
	}
	return "neither private nor public"
}

func human(b float64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.1f GiB", b/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", b/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1f KiB", b/(1<<10))
	case b == 0:
		return "-"
	}
	return fmt.Sprintf("%.0f B", b)
}
