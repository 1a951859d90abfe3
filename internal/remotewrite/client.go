package remotewrite

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/version"
)

// maxErrBody is how much of an error response is kept for the log: enough
// for Prometheus' and Mimir's one-line reasons, bounded against a receiver
// that answers with a whole HTML page.
const maxErrBody = 512

// StatusError is a final (not retried) rejection by the receiver.
type StatusError struct {
	Code int
	// Body is the first bytes of the response body, for the log.
	Body string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("remote write rejected: HTTP %d: %s", e.Code, e.Body)
}

// Client sends compressed WriteRequests to one endpoint. It makes one
// attempt per call and classifies the outcome; the retrying is done by the
// caller (retry in backoff.go), so the two can be tested apart.
type Client struct {
	url        string
	timeout    time.Duration
	retryOn429 bool
	headers    http.Header
	hc         *http.Client
	basicUser  string
	password   *fileSecret
	token      *fileSecret
}

// ClientOptions are the client's settings that are not the endpoint's.
type ClientOptions struct {
	// RetryOn429 treats 429 Too Many Requests as retryable (honouring
	// Retry-After); off, a 429 is final, as Cortex uses it for limits.
	RetryOn429 bool
	// Component names the sender in the User-Agent ("server", "agent").
	Component string
}

// NewClient builds the client of one endpoint. cfg must be validated. It
// reads the credential and TLS files once, so that a missing file fails at
// start-up rather than at the first push.
func NewClient(cfg EndpointConfig, opts ClientOptions) (*Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tlsCfg, err := newTLSConfig(cfg.TLS)
	if err != nil {
		return nil, fmt.Errorf("endpoint %q: %w", cfg.Name, err)
	}
	tr.TLSClientConfig = tlsCfg
	// One snapshot is sent by at most a few shards at once; keep their
	// connections warm between pushes.
	tr.MaxIdleConnsPerHost = 64
	c := &Client{
		url:        cfg.URL,
		timeout:    cfg.Timeout,
		retryOn429: opts.RetryOn429,
		headers:    http.Header{},
		hc:         &http.Client{Transport: tr},
	}
	for k, v := range cfg.Headers {
		c.headers.Set(k, v)
	}
	c.headers.Set("Content-Encoding", ContentEncoding)
	c.headers.Set("Content-Type", ContentType)
	c.headers.Set(HeaderVersion, ProtocolVersion)
	c.headers.Set("User-Agent", version.UserAgent(opts.Component))
	if cfg.BasicAuth != nil {
		c.basicUser = cfg.BasicAuth.Username
		c.password = &fileSecret{path: cfg.BasicAuth.PasswordFile}
		if _, err := c.password.get(); err != nil {
			return nil, fmt.Errorf("endpoint %q: basic_auth password_file: %w", cfg.Name, err)
		}
	}
	if cfg.BearerTokenFile != "" {
		c.token = &fileSecret{path: cfg.BearerTokenFile}
		if _, err := c.token.get(); err != nil {
			return nil, fmt.Errorf("endpoint %q: bearer_token_file: %w", cfg.Name, err)
		}
	}
	return c, nil
}

// Store makes one attempt to send body, a snappy-compressed WriteRequest.
// It returns the HTTP status (0 when there was no response) and nil on
// 2xx, a retryableError for network errors, 5xx and (if enabled) 429, and
// a *StatusError for everything else, which must not be retried: the
// receiver will reject the same request again. The response body is
// always drained and closed so the connection can be reused.
func (c *Client) Store(ctx context.Context, body []byte) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		// The URL was validated, so this is a programming error; retrying
		// cannot fix it.
		return 0, fmt.Errorf("building request: %w", err)
	}
	req.Header = c.headers.Clone()
	if c.password != nil {
		pw, err := c.password.get()
		if err != nil {
			return 0, retryableError{err: fmt.Errorf("reading password: %w", err)}
		}
		req.SetBasicAuth(c.basicUser, pw)
	}
	if c.token != nil {
		tok, err := c.token.get()
		if err != nil {
			return 0, retryableError{err: fmt.Errorf("reading bearer token: %w", err)}
		}
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, retryableError{err: err}
	}
	defer func() {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
	}()
	if resp.StatusCode/100 == 2 {
		return resp.StatusCode, nil
	}
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrBody))
	serr := &StatusError{Code: resp.StatusCode, Body: strings.TrimSpace(string(msg))}
	switch {
	case resp.StatusCode/100 == 5:
		return resp.StatusCode, retryableError{err: serr}
	case resp.StatusCode == http.StatusTooManyRequests && c.retryOn429:
		return resp.StatusCode, retryableError{err: serr, after: parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())}
	}
	return resp.StatusCode, serr
}

// parseRetryAfter reads either form of Retry-After: delay-seconds or an
// HTTP date. It returns 0 for an absent or unreadable value, leaving the
// wait to the backoff.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil {
		return max(time.Duration(s)*time.Second, 0)
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(t.Sub(now), 0)
	}
	return 0
}

// fileSecret is a credential kept in a file (a mounted Kubernetes secret).
// It is re-read whenever the file's size or modification time changes, so
// rotated secrets are picked up without a restart; a file that is briefly
// missing during a rotation falls back to the last good value.
type fileSecret struct {
	path string

	mu      sync.Mutex
	modTime time.Time
	size    int64
	value   string
	loaded  bool
}

func (s *fileSecret) get() (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fi, err := os.Stat(s.path)
	if err != nil {
		if s.loaded {
			return s.value, nil
		}
		return "", err
	}
	if s.loaded && fi.ModTime().Equal(s.modTime) && fi.Size() == s.size {
		return s.value, nil
	}
	b, err := os.ReadFile(s.path)
	if err != nil {
		if s.loaded {
			return s.value, nil
		}
		return "", err
	}
	s.value = strings.TrimSpace(string(b))
	s.modTime, s.size, s.loaded = fi.ModTime(), fi.Size(), true
	return s.value, nil
}

// newTLSConfig builds the client TLS settings. The client certificate is
// reloaded when its files change (certificates are rotated far more often
// than CAs); the CA bundle is read once.
func newTLSConfig(cfg TLSConfig) (*tls.Config, error) {
	tc := &tls.Config{InsecureSkipVerify: cfg.InsecureSkipVerify} //nolint:gosec // opt-in, documented
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("tls ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls ca_file %s: no PEM certificate found", cfg.CAFile)
		}
		tc.RootCAs = pool
	}
	if cfg.CertFile != "" {
		kp := &keyPair{cert: cfg.CertFile, key: cfg.KeyFile}
		if _, err := kp.get(); err != nil {
			return nil, err
		}
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return kp.get() }
	}
	return tc, nil
}

// keyPair is a client certificate reloaded when either file changes.
type keyPair struct {
	cert, key string

	mu      sync.Mutex
	certMod time.Time
	keyMod  time.Time
	loaded  *tls.Certificate
}

func (k *keyPair) get() (*tls.Certificate, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	cfi, err1 := os.Stat(k.cert)
	kfi, err2 := os.Stat(k.key)
	if err := errors.Join(err1, err2); err != nil {
		if k.loaded != nil {
			return k.loaded, nil
		}
		return nil, fmt.Errorf("tls cert_file/key_file: %w", err)
	}
	if k.loaded != nil && cfi.ModTime().Equal(k.certMod) && kfi.ModTime().Equal(k.keyMod) {
		return k.loaded, nil
	}
	c, err := tls.LoadX509KeyPair(k.cert, k.key)
	if err != nil {
		if k.loaded != nil {
			return k.loaded, nil
		}
		return nil, fmt.Errorf("tls cert_file %s / key_file %s: %w", k.cert, k.key, err)
	}
	k.loaded, k.certMod, k.keyMod = &c, cfi.ModTime(), kfi.ModTime()
	return k.loaded, nil
}
