package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"github.com/urfave/cli/v2"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kubezonnet/kubezonnet/internal/command"
	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/version"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// checkpointReserve is the part of --shutdown-grace-period kept for the
// final checkpoint (and closing) rather than given to the final push.
func checkpointReserve(grace time.Duration, durable bool) time.Duration {
	if !durable {
		return grace / 10
	}
	return min(grace/3, 10*time.Second)
}

// tokenRecheck is how often at most the token file's mtime is checked.
const tokenRecheck = 5 * time.Second

// Command returns `kubezonnet server`.
func Command() *cli.Command {
	return &cli.Command{
		Name:   "server",
		Usage:  "receive agents' flows, attribute them to pods, workloads and zones, push series by remote-write",
		Flags:  Flags(),
		Action: command.Action("server", ConfigFromCLI, func(c *Config) command.Log { return c.Log }, Run),
	}
}

// Run runs the server until ctx ends, then shuts down within
// --shutdown-grace-period, in order: refuse new batches (503: agents keep
// them) and finish the ones being handled, push a final snapshot with
// what is left of the grace period less the checkpoint's reserve, write a
// checkpoint, close. Each step is logged with its duration.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	base := log // components add their own "component" attribute
	log = log.With("component", "server")
	if setGCPercent(os.Getenv) {
		log.Debug("GOGC unset: the server sets its own (its heap is long-lived series state)", "gc_percent", defaultGCPercent)
	}
	bound := maxPodPairs(&cfg, debug.SetMemoryLimit(-1), "/")
	bound.logStart(log)
	cfg.MaxPodPairs = bound.pairs
	restCfg, err := clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	if err != nil {
		return fmt.Errorf("kubernetes client config (--kubeconfig %q): %w", cfg.Kubeconfig, err)
	}
	restCfg.UserAgent = version.UserAgent("server")
	// What the informers' lists and watches fail with, for the warnings
	// and /readyz while they have not synced.
	cfg.Resolve.APIServer, cfg.Resolve.Failures = restCfg.Host, new(resolve.Failures)
	restCfg.Wrap(cfg.Resolve.Failures.Transport)
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	if cfg.Resolve.Metadata, err = metadata.NewForConfig(restCfg); err != nil {
		return fmt.Errorf("kubernetes metadata client: %w", err)
	}
	res, err := resolve.New(cfg.Resolve, client, base)
	if err != nil {
		return err
	}

	var auth authenticator
	switch cfg.AuthMode {
	case AuthToken:
		if auth, err = newTokenFile(cfg.TokenFile, tokenRecheck, log); err != nil {
			return err
		}
	case AuthTokenReview:
		auth = newTokenReview(clientReviewer{client: client, audience: cfg.TokenAudience}, cfg.serviceAccountUser())
	default:
		log.Warn("agent authentication is disabled (--auth-mode none): anyone reaching the server can send flows")
		auth = noAuth{}
	}

	var flowOut io.Writer = os.Stdout
	if cfg.FlowLogFile != "" && cfg.FlowLogFile != "-" {
		f, err := os.OpenFile(cfg.FlowLogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return fmt.Errorf("--flow-log-file %q: %w", cfg.FlowLogFile, err)
		}
		defer f.Close()
		flowOut = f
	}

	reg := metrics.New()
	srv, err := newServer(&cfg, deps{
		resolver: res,
		auth:     auth,
		reg:      reg,
		log:      log,
		flowLog:  flowOut,
		ready:    readiness(res.SyncError),
	})
	if err != nil {
		return err
	}
	if srv.state != nil {
		defer srv.state.close()
	}
	var pusher *remotewrite.Pusher
	if cfg.RemoteWrite.Enabled() {
		if pusher, err = remotewrite.NewPusher(cfg.RemoteWrite, srv.Sources(), reg, base); err != nil {
			return err
		}
		pusher.OnDelivered(srv.agg.Delivered)
	} else {
		log.Warn("no remote-write endpoint (--keep-only): series are kept, not pushed")
	}

	ln, err := net.Listen("tcp", cfg.ListenAddress)
	if err != nil {
		return fmt.Errorf("--listen-address %q: %w", cfg.ListenAddress, err)
	}
	httpSrv := &http.Server{
		Handler:           srv.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       time.Minute,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	log.Info("server starting", "version", version.Version, "listen", ln.Addr().String(),
		"auth_mode", cfg.AuthMode, "remote_write_endpoints", len(cfg.RemoteWrite.Endpoints),
		"keep_only", cfg.KeepOnly, "api_server", restCfg.Host,
		"state_dir", cfg.StateDir, "durable", cfg.StateDir != "")
	if cfg.StateDir == "" {
		log.Warn("counters are not durable (no --state-dir): a crash loses what was not pushed yet, and counters restart at zero")
	}

	var wg sync.WaitGroup
	resCtx, stopResolver := context.WithCancel(context.Background())
	defer stopResolver()
	resErr := make(chan error, 1)
	resDone := make(chan struct{}) // not in wg: the exit does not wait for it
	go func() {
		defer close(resDone)
		resErr <- res.Run(resCtx)
	}()
	// The flow log outlives ctx until in-flight requests have finished,
	// so their events are written too.
	logCtx, stopLog := context.WithCancel(context.Background())
	defer stopLog()
	wg.Go(func() { srv.runFlowLog(logCtx) })
	pushCtx, stopPush := context.WithCancel(ctx)
	defer stopPush()
	if pusher != nil {
		wg.Go(func() { _ = pusher.Run(pushCtx) })
	}
	cpCtx, stopCheckpoints := context.WithCancel(context.Background())
	defer stopCheckpoints()
	if srv.state != nil {
		wg.Go(func() { srv.state.run(cpCtx, cfg.CheckpointInterval) })
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- httpSrv.Serve(ln) }()

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err := <-serveErr:
		runErr = fmt.Errorf("http server: %w", err)
	case err := <-resErr:
		runErr = fmt.Errorf("resolver: %w", err)
	}

	// The informers stop alongside the shutdown steps; the index they feed
	// stays readable for the batches still being handled.
	stopResolver()
	shutdown(shutdownSteps{
		log: log, grace: cfg.ShutdownGracePeriod, srv: srv, http: httpSrv, pusher: pusher,
		stop: func() {
			stopLog()
			stopPush()
			stopCheckpoints()
		},
	})
	// They hold nothing to save, so the exit does not wait for them:
	// while the API server refuses connections, client-go sleeps out its
	// retry backoff (up to a minute) before it notices it was stopped.
	select {
	case <-resDone:
	default:
		log.Info("not waiting for the informers to stop (a client-go retry backoff)")
	}
	wg.Wait()
	if srv.state != nil {
		if err := srv.state.close(); err != nil {
			log.Warn("closing the write-ahead log", "err", err)
		}
	}
	log.Info("server stopped")
	return runErr
}

// shutdownSteps is what shutdown stops, in order.
type shutdownSteps struct {
	log    *slog.Logger
	grace  time.Duration
	srv    *Server
	http   *http.Server
	pusher *remotewrite.Pusher // nil: nothing to push to
	stop   func()              // ends the flow log, push and checkpoint loops
}

// shutdown runs the shutdown steps within the grace period. A step that
// runs out of time is logged with what it left undone; the next steps
// still run.
func shutdown(s shutdownSteps) {
	start := time.Now()
	deadline := start.Add(s.grace)
	durable := s.srv.state != nil
	step := func(name string, until time.Time, fn func(ctx context.Context) error, attrs ...any) {
		t := time.Now()
		ctx, cancel := context.WithDeadline(context.Background(), until)
		defer cancel()
		err := fn(ctx)
		attrs = append([]any{"step", name, "duration", time.Since(t).String()}, attrs...)
		if err != nil {
			s.log.Warn("shutdown step incomplete", append(attrs, "err", err)...)
			return
		}
		s.log.Info("shutdown step done", attrs...)
	}
	pushUntil := deadline.Add(-checkpointReserve(s.grace, durable))
	// Agents get 503 from here on and keep their batches; requests being
	// handled finish (their batches are applied and durable).
	step("refuse new batches", pushUntil, s.srv.ingest.Drain)
	s.stop()
	if s.pusher != nil {
		lost := "kept in --state-dir, pushed after the restart"
		if !durable {
			lost = "lost: no --state-dir"
		}
		step("final push", pushUntil, s.pusher.Flush, "if_incomplete", lost)
	}
	if durable {
		step("checkpoint", deadline, s.srv.state.checkpoint)
	}
	step("close listener", deadline, func(ctx context.Context) error {
		if err := s.http.Shutdown(ctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	s.log.Info("shutdown complete", "duration", time.Since(start).String(), "grace_period", s.grace.String())
}
