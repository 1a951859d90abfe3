package resolve

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/metadata/metadatainformer"
	"k8s.io/client-go/tools/cache"
)

// Defaults for the server's flags.
const (
	// DefaultReleasedIPTTL covers an agent's flush interval (10s) plus its
	// retry buffer with room to spare: a deleted pod's last flows arrive
	// well within it, and an IP is rarely reused sooner by the CNI anyway.
	DefaultReleasedIPTTL = 5 * time.Minute
	// DefaultReuseWindow is how much earlier than this server's informer
	// sees it a pod may really hold a reused address: the watch latency
	// and the kubelet's status update, with room.
	DefaultReuseWindow = 2 * time.Second
	// DefaultReleasedIPCacheSize remembers 64Ki released addresses, more
	// than a 500-node cluster releases within DefaultReleasedIPTTL.
	DefaultReleasedIPCacheSize = 65536
)

// Config is the resolver's part of the server configuration.
type Config struct {
	// StaticEndpointsFile is the optional CIDR file (see ParseStaticEndpoints).
	StaticEndpointsFile string
	// ReleasedIPTTL is how long after its release an address still resolves
	// to the pod that held it, for flows observed up to then. It is also
	// how long a Service's virtual IP answers after the Service was deleted
	// (or stopped serving the port), and how far back the readiness of its
	// endpoints per zone is remembered: both serve the same late flows.
	ReleasedIPTTL time.Duration
	// ReleasedIPCacheSize bounds the number of released addresses remembered.
	ReleasedIPCacheSize int
	// ReuseWindow is how much earlier than the informer shows it a new
	// holder of a released address may have it: flows after the release
	// go to a holder seen within that window of them, and an agent's
	// batch with such an address of its own node and no holder shown yet
	// waits for one (AwaitsHolder) that long at most.
	ReuseWindow time.Duration
	// PodLabels are pod labels to keep and report in Endpoint.Labels.
	PodLabels []string
	// Metadata, when set, reads ReplicaSets and Jobs through the metadata
	// API to name Deployments and CronJobs exactly. Without it (or without
	// permission to list them), the ReplicaSet name pattern is used and Jobs
	// are reported as Jobs.
	Metadata metadata.Interface
	// APIServer is the URL of the API server the client talks to, only
	// for the warnings while the informers have not synced.
	APIServer string
	// Failures, when set, is where the client's transport records failed
	// lists and watches (Failures.Transport); nil: only what the informers
	// report is known.
	Failures *Failures
}

// Validate checks the configuration; errors name the flag and the value.
func (c Config) Validate() error {
	if c.ReleasedIPTTL <= 0 {
		return fmt.Errorf("--released-ip-ttl must be positive, got %s", c.ReleasedIPTTL)
	}
	if c.ReuseWindow < 0 || c.ReuseWindow > c.ReleasedIPTTL {
		return fmt.Errorf("--released-ip-reuse-window must be between 0 and --released-ip-ttl (%s), got %s", c.ReleasedIPTTL, c.ReuseWindow)
	}
	if c.ReleasedIPCacheSize <= 0 {
		return fmt.Errorf("--released-ip-cache-size must be positive, got %d", c.ReleasedIPCacheSize)
	}
	for _, l := range c.PodLabels {
		if l == "" {
			return errors.New("pod labels: empty label name")
		}
	}
	return nil
}

// Resolver maps addresses seen in flows to endpoints: pods, nodes, static
// endpoints, the internet, or unknown. It is safe for concurrent use; see
// doc.go for the resolution order, time semantics and memory cost.
type Resolver struct {
	cfg    Config
	client kubernetes.Interface
	log    *slog.Logger
	ix     *index
	svc    *serviceTable
	static *staticTable
	synced atomic.Bool
	ran    atomic.Bool
	// failures holds the last failed list or watch, for SyncError.
	failures *Failures
	// reportEvery is the interval of the "not synced" warnings
	// (DefaultSyncReportInterval); tests shorten it.
	reportEvery time.Duration
	// now is the clock of informer events; tests replace it.
	now func() time.Time
	// events counts handled informer events, so tests can wait for one.
	events atomic.Uint64
}

// New validates cfg, loads the static endpoints file and prepares the
// resolver; Run starts watching the cluster.
func New(cfg Config, client kubernetes.Interface, log *slog.Logger) (*Resolver, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if client == nil {
		return nil, errors.New("resolver: nil kubernetes client")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var entries []StaticEndpoint
	if cfg.StaticEndpointsFile != "" {
		f, err := os.Open(cfg.StaticEndpointsFile)
		if err != nil {
			return nil, fmt.Errorf("--static-endpoints-file %q: %w", cfg.StaticEndpointsFile, err)
		}
		entries, err = ParseStaticEndpoints(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("--static-endpoints-file %q: %w", cfg.StaticEndpointsFile, err)
		}
	}
	ix, err := newIndex(cfg.ReleasedIPCacheSize, cfg.ReleasedIPTTL, cfg.ReuseWindow, cfg.PodLabels)
	if err != nil {
		return nil, fmt.Errorf("--released-ip-cache-size %d: %w", cfg.ReleasedIPCacheSize, err)
	}
	return &Resolver{
		cfg:    cfg,
		client: client,
		log:    log.With("component", "resolve"),
		ix:     ix,
		svc:    newServiceTable(cfg.ReleasedIPTTL, cfg.ReuseWindow),
		static: newStaticTable(entries),
		now:    time.Now,

		failures:    cmp.Or(cfg.Failures, new(Failures)),
		reportEvery: DefaultSyncReportInterval,
	}, nil
}

// Resolve returns the endpoint ip belonged to when a flow was observed at
// time at. It never allocates and returns a shared, immutable Endpoint.
//
// Order: the current holder (pod, or node for host addresses) unless the
// flow predates it; a recently released pod; a static endpoint (longest
// prefix); the internet for public addresses; unknown otherwise.
func (r *Resolver) Resolve(ip netip.Addr, at time.Time) *Endpoint {
	ep, _ := r.Lookup(ip, at, "")
	return ep
}

// Lookup is Resolve that also reports whether the address awaits a new
// holder: no pod holds it now, and its last pod released it before at,
// less than Config.ReuseWindow ago, so the flow may belong to a pod the
// informer does not show yet (and would go to the released one). The
// server holds such a batch back until the new holder shows up or the
// window passed. The check costs nothing for addresses without released
// history. A flow's endpoint names its node (Endpoint.Node) for pods and
// host addresses: the server drops flows an agent reports for sources of
// another node.
//
// node is the node whose agent reported the flow ("" for none): after a
// release that node reported (Released), its flows of the address go to a
// later holder, and await one while the informer shows none.
func (r *Resolver) Lookup(ip netip.Addr, at time.Time, node string) (ep *Endpoint, awaiting bool) {
	ip = normalize(ip)
	if !ip.IsValid() || ip.IsUnspecified() {
		return epInvalidAddress, false
	}
	ep, s := r.ix.lookupSlot(ip, at)
	if s.cut && node != "" {
		if after, await, ok := r.ix.afterCut(ip, at, node, &s, ep, r.now()); ok {
			if after != nil {
				return after, await
			}
			return r.outside(ip), await
		}
	}
	if s.released {
		awaiting = r.ix.awaitsHolder(ip, &s, at, r.now())
	}
	if ep != nil {
		return ep, awaiting
	}
	return r.outside(ip), awaiting
}

// outside resolves an address no pod or node claims.
func (r *Resolver) outside(ip netip.Addr) *Endpoint {
	if ep := r.static.lookup(ip); ep != nil {
		return ep
	}
	if isPublic(ip) {
		return epExternal
	}
	if !r.synced.Load() {
		return epNotSynced
	}
	return epNoPod
}

// HasSynced reports whether the informers have delivered their initial
// lists, i.e. whether "no_pod" answers can be trusted. SyncError says why
// not (for /readyz).
func (r *Resolver) HasSynced() bool { return r.synced.Load() }

// Stats counts what the index holds, for self-metrics.
type Stats struct {
	Pods, Nodes, PodIPs, HostIPs, ReleasedIPs int
	// Services are the Services known now; ServiceVIPs the virtual IP,
	// port and protocol triples indexed, released ones included.
	Services, ServiceVIPs int
}

// Stats returns the current sizes of the index.
func (r *Resolver) Stats() Stats {
	r.ix.mu.RLock()
	defer r.ix.mu.RUnlock()
	st := Stats{Pods: len(r.ix.pods), Nodes: len(r.ix.nodes), ReleasedIPs: r.ix.released.Len()}
	count := func(s addrSlot) {
		switch {
		case s.pod != nil:
			st.PodIPs++
		case s.node != nil:
			st.HostIPs++
		}
	}
	for _, s := range r.ix.addrs {
		count(s)
	}
	r.svc.mu.RLock()
	defer r.svc.mu.RUnlock()
	st.ServiceVIPs = len(r.svc.vips)
	for _, s := range r.svc.byName {
		if s.info != nil {
			st.Services++
		}
	}
	return st
}

var (
	gvrReplicaSets = schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "replicasets"}
	gvrJobs        = schema.GroupVersionResource{Group: "batch", Version: "v1", Resource: "jobs"}
)

// Run starts the informers and blocks until ctx is done. Owners and nodes
// are synced before pods are listed, so pods are named and placed right from
// their first event. Until all have synced, a warning every
// DefaultSyncReportInterval names the API server and its last error.
func (r *Resolver) Run(ctx context.Context) error {
	if !r.ran.CompareAndSwap(false, true) {
		return errors.New("resolver: Run called twice")
	}
	start := time.Now()
	reportCtx, stopReport := context.WithCancel(ctx)
	var reporting sync.WaitGroup
	reporting.Go(func() { r.reportUnsynced(reportCtx, start, r.reportEvery) })
	defer reporting.Wait()
	defer stopReport()
	var synced []cache.InformerSynced

	if r.cfg.Metadata != nil {
		mf := metadatainformer.NewSharedInformerFactory(r.cfg.Metadata, 0)
		owners := &ownerStore{}
		for _, o := range []struct {
			gvr  schema.GroupVersionResource
			kind string
			dst  *cache.Indexer
		}{{gvrReplicaSets, kindReplicaSet, &owners.replicaSets}, {gvrJobs, kindJob, &owners.jobs}} {
			// An informer without list permission would never sync (and
			// /readyz would never pass): probe once and fall back instead.
			if _, err := r.cfg.Metadata.Resource(o.gvr).List(ctx, metav1.ListOptions{Limit: 1}); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				r.log.Warn("cannot list owners, naming workloads by pattern", "resource", o.gvr.Resource, "err", err)
				continue
			}
			inf := mf.ForResource(o.gvr).Informer()
			if err := inf.SetTransform(ownerTransform); err != nil {
				return fmt.Errorf("setting %s transform: %w", o.gvr.Resource, err)
			}
			if err := r.watchErrors(inf, o.gvr.Resource); err != nil {
				return err
			}
			reg, err := inf.AddEventHandler(r.ownerHandler(o.kind))
			if err != nil {
				return fmt.Errorf("watching %s: %w", o.gvr.Resource, err)
			}
			*o.dst = inf.GetIndexer()
			synced = append(synced, reg.HasSynced)
		}
		r.ix.mu.Lock()
		r.ix.owners = owners
		r.ix.mu.Unlock()
		mf.Start(ctx.Done())
		defer mf.Shutdown()
	}

	f := informers.NewSharedInformerFactory(r.client, 0)
	nodeInf := f.Core().V1().Nodes().Informer()
	if err := nodeInf.SetTransform(nodeTransform); err != nil {
		return fmt.Errorf("setting node transform: %w", err)
	}
	if err := r.watchErrors(nodeInf, "nodes"); err != nil {
		return err
	}
	nodeReg, err := nodeInf.AddEventHandler(r.nodeHandler())
	if err != nil {
		return fmt.Errorf("watching nodes: %w", err)
	}
	synced = append(synced, nodeReg.HasSynced)
	f.Start(ctx.Done())
	defer f.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil // ctx done before sync
	}

	podInf := f.Core().V1().Pods().Informer()
	if err := podInf.SetTransform(podTransform(r.cfg.PodLabels)); err != nil {
		return fmt.Errorf("setting pod transform: %w", err)
	}
	if err := r.watchErrors(podInf, "pods"); err != nil {
		return err
	}
	podReg, err := podInf.AddEventHandler(r.podHandler())
	if err != nil {
		return fmt.Errorf("watching pods: %w", err)
	}
	svcSynced, ok, err := r.watchServices(ctx, f)
	if err != nil || !ok {
		return err
	}
	f.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), append(svcSynced, podReg.HasSynced)...) {
		return nil
	}
	r.synced.Store(true)
	st := r.Stats()
	r.log.Info("informers synced", "duration", time.Since(start).Round(time.Millisecond).String(), "pods", st.Pods, "nodes", st.Nodes, "pod_ips", st.PodIPs, "host_ips", st.HostIPs, "services", st.Services, "service_vips", st.ServiceVIPs)
	<-ctx.Done()
	return nil
}

func (r *Resolver) podHandler() cache.ResourceEventHandler {
	return cache.ResourceEventHandlerDetailedFuncs{
		AddFunc: func(obj any, initial bool) {
			defer r.events.Add(1)
			if p, ok := obj.(*corev1.Pod); ok {
				r.ix.upsertPod(p, r.now(), initial)
			}
		},
		UpdateFunc: func(_, obj any) {
			defer r.events.Add(1)
			if p, ok := obj.(*corev1.Pod); ok {
				r.ix.upsertPod(p, r.now(), false)
			}
		},
		DeleteFunc: func(obj any) {
			defer r.events.Add(1)
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				if p, ok := t.Obj.(*corev1.Pod); ok {
					obj = p
				} else if ns, name, err := cache.SplitMetaNamespaceKey(t.Key); err == nil {
					r.ix.deletePod(ns, name, "", r.now())
					return
				}
			}
			if p, ok := obj.(*corev1.Pod); ok {
				r.ix.deletePod(p.Namespace, p.Name, p.UID, r.now())
			}
		},
	}
}

func (r *Resolver) nodeHandler() cache.ResourceEventHandler {
	upsert := func(obj any) {
		defer r.events.Add(1)
		if n, ok := obj.(*corev1.Node); ok {
			r.ix.upsertNode(n)
		}
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    upsert,
		UpdateFunc: func(_, obj any) { upsert(obj) },
		DeleteFunc: func(obj any) {
			defer r.events.Add(1)
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				r.ix.deleteNode(t.Key)
				return
			}
			if n, ok := obj.(*corev1.Node); ok {
				r.ix.deleteNode(n.Name)
			}
		},
	}
}

// ownerHandler renames the pods of a ReplicaSet or Job when its metadata
// (and so its controller) appears, changes or goes away.
func (r *Resolver) ownerHandler(kind string) cache.ResourceEventHandler {
	changed := func(obj any) {
		defer r.events.Add(1)
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			if ns, name, err := cache.SplitMetaNamespaceKey(t.Key); err == nil {
				r.ix.ownerChanged(ownerKey{kind: kind, namespace: ns, name: name})
			}
			return
		}
		if m, ok := obj.(*metav1.PartialObjectMetadata); ok {
			r.ix.ownerChanged(ownerKey{kind: kind, namespace: m.Namespace, name: m.Name})
		}
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    changed,
		UpdateFunc: func(_, obj any) { changed(obj) },
		DeleteFunc: changed,
	}
}
