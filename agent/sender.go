package agent

import (
	"context"
	"strings"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// newClient builds the remote-write client of the server's ingest
// endpoint: the remote-write 1.0 headers, the agent's User-Agent, the
// bearer token from --token-file (re-read when the file changes: projected
// tokens are rotated on disk), and the per-status decision of
// remotewrite.Client (2xx done; 5xx, 429 and transport errors retried;
// any other status final).
func newClient(cfg Config) (*remotewrite.Client, error) {
	return remotewrite.NewClient(remotewrite.EndpointConfig{
		Name:            "server",
		URL:             cfg.serverWriteURL(),
		Timeout:         max(cfg.FlushInterval, 5*time.Second),
		BearerTokenFile: cfg.TokenFile,
	}, remotewrite.ClientOptions{RetryOn429: true, Component: "agent"})
}

// newNoticeClient builds the client of the server's release notices
// (internal/wire, "Release notices"): the same as newClient's, to another
// path, with a short timeout (a notice is best effort).
func newNoticeClient(cfg Config) (*remotewrite.Client, error) {
	return remotewrite.NewClient(remotewrite.EndpointConfig{
		Name:            "server-releases",
		URL:             strings.TrimSuffix(cfg.ServerURL, "/") + wire.ReleasesPath,
		Timeout:         5 * time.Second,
		BearerTokenFile: cfg.TokenFile,
	}, remotewrite.ClientOptions{Component: "agent"})
}

// sendWithRetry posts body until it is accepted, refused for good, or ctx
// ends, with capped exponential backoff and jitter between attempts (so
// that the agents of a cluster do not resend in lockstep after an
// outage). onRetry is called before every wait.
func sendWithRetry(ctx context.Context, c *remotewrite.Client, b *remotewrite.Backoff, body []byte, onRetry func(err error, wait time.Duration)) error {
	return remotewrite.Retry(ctx, b, nil, func() error {
		_, err := c.Store(ctx, body)
		return err
	}, onRetry)
}
