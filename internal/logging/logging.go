// Package logging builds the *slog.Logger that every component receives by
// injection. There is no global logger of ours: tests pass their own. The
// one process-wide logger is klog, which the Kubernetes client libraries
// use; RouteKlog sends it through the injected logger.
package logging

import (
	"fmt"
	"io"
	"log/slog"
	"strings"

	"k8s.io/klog/v2"
)

// Formats and levels accepted by New, listed for flag help and errors.
var (
	Formats = []string{"json", "text"}
	Levels  = []string{"debug", "info", "warn", "error"}
)

// ParseLevel parses one of Levels.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil || !contains(Levels, strings.ToLower(s)) {
		return 0, fmt.Errorf("invalid log level %q (want one of %s)", s, strings.Join(Levels, ", "))
	}
	return l, nil
}

// New returns a logger writing format ("json" or "text") to w at level.
func New(w io.Writer, format, level string) (*slog.Logger, error) {
	l, err := ParseLevel(level)
	if err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("invalid log format %q (want one of %s)", format, strings.Join(Formats, ", "))
}

// Discard returns a logger that drops everything, for callers that were
// given no logger.
func Discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// RouteKlog makes client-go's logging (klog, process-wide by design: the
// Kubernetes libraries log through it) go through log, so that its
// warnings, such as an API server that cannot be reached while informers
// sync, appear in the same format as the rest of the log instead of as
// plain text in the middle of JSON lines.
func RouteKlog(log *slog.Logger) {
	klog.SetSlogLogger(log.With("component", "client-go"))
}
