// Package server is `kubezonnet server`: it accepts the agents' batches
// over remote-write, resolves their addresses to pods, nodes, static
// endpoints and zones (server/resolve), aggregates cumulative counters
// (server/aggregate), writes flow logs (server/flowlog) and pushes every
// series to remote-write endpoints (internal/remotewrite).
//
// HTTP endpoints: POST /api/v1/write (agents), /healthz (alive), /readyz
// (informers synced; the body says why not), /metrics (self-metrics). The
// configuration guarantees somewhere to push to unless --keep-only.
package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/wire"
	"github.com/kubezonnet/kubezonnet/server/aggregate"
	"github.com/kubezonnet/kubezonnet/server/flowlog"
)

// Server ties ingest, aggregation and flow logs together behind one
// http.Handler. Build it with newServer; the command adds the resolver,
// the pusher and the HTTP listener around it.
type Server struct {
	reg    *metrics.Registry
	log    *slog.Logger
	ingest *Ingest
	agg    *aggregate.Aggregator
	agents *agentMetrics
	flog   *flowlog.Logger
	ready  func() error
	// state is the state directory's journal and checkpoints; nil
	// without --state-dir.
	state *durable
}

// deps are what a Server is built from besides its Config: injected so
// tests can use a table-driven fake resolver and their own writers.
type deps struct {
	resolver Resolver
	auth     authenticator
	reg      *metrics.Registry
	log      *slog.Logger
	flowLog  io.Writer // nil: flow logging off regardless of classes
	// ready reports why the server is not ready (nil when it is).
	ready func() error
	now   func() time.Time
}

func newServer(cfg *Config, d deps) (*Server, error) {
	if d.now == nil {
		d.now = time.Now
	}
	dd := newDedup(cfg.IncarnationTTL, cfg.MaxIncarnations, d.reg)
	acfg := aggregate.Config{
		AllPairs:         cfg.AllPairs,
		MaxPodPairs:      cfg.MaxPodPairs,
		MaxServiceSeries: cfg.MaxServiceSeries,
		IdleTimeout:      cfg.SeriesIdleTimeout,
		Now:              d.now,
	}
	var st *durable
	if cfg.StateDir != "" {
		st = newDurable(cfg.StateDir, dd, d.reg, d.log, d.now)
		acfg.Journal = st
	}
	agg, err := aggregate.New(acfg, d.reg)
	if err != nil {
		return nil, err
	}
	if st != nil {
		if err := st.open(agg, d.reg); err != nil {
			return nil, err
		}
	}
	var flog *flowlog.Logger
	if d.flowLog != nil && cfg.FlowLogClasses != 0 {
		flog = flowlog.New(flowlog.Config{Classes: cfg.FlowLogClasses}, d.flowLog, d.reg)
	}
	agents := newAgentMetrics(cfg.SeriesIdleTimeout, cfg.MaxAgentSeries, d.reg)
	in := newIngest(IngestConfig{MaxBodyBytes: cfg.MaxBodyBytes, Limits: cfg.Limits}, ingestDeps{
		res: d.resolver, agg: agg, flog: flog, auth: d.auth, dedup: dd, agents: agents, reg: d.reg, log: d.log,
	})
	in.now = d.now
	if st != nil {
		in.state = st
	}
	return &Server{reg: d.reg, log: d.log, ingest: in, agg: agg, agents: agents, flog: flog, ready: d.ready, state: st}, nil
}

// Handler returns the server's HTTP routes.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/api/v1/write", s.ingest)
	mux.Handle(wire.ReleasesPath, s.ingest)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if s.ready != nil {
			if err := s.ready(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.Handle("/metrics", s.reg.Handler())
	return mux
}

// Sources returns what the pusher sends: aggregates, agent self-metrics
// and the server's own metrics.
func (s *Server) Sources() []remotewrite.Source {
	return []remotewrite.Source{s.agg, s.agents, remotewrite.RegistrySource(s.reg)}
}

// runFlowLog runs the flow log writer until ctx ends (no-op without one).
func (s *Server) runFlowLog(ctx context.Context) {
	if s.flog != nil {
		s.flog.Run(ctx)
	}
}

// readiness is the condition of /readyz: the resolver's informers have
// synced, so that pods are attributed. syncErr says why not (the last
// failed list or watch) and nil once synced. Somewhere to push to is not
// checked here: Config.Validate refuses to start without an endpoint
// unless --keep-only asks for exactly that.
func readiness(syncErr func() error) func() error {
	return func() error {
		if err := syncErr(); err != nil {
			return fmt.Errorf("resolver %w", err) // "resolver informers not synced yet: ..."
		}
		return nil
	}
}
