package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Authentication modes of --auth-mode.
const (
	AuthToken       = "token"
	AuthTokenReview = "tokenreview"
	AuthNone        = "none"
)

// NodeNameExtra is the TokenReview extra key that names the node of the
// pod a projected ServiceAccount token is bound to (Kubernetes 1.30+).
const NodeNameExtra = "authentication.kubernetes.io/node-name"

// Errors of authentication, mapped to status codes by the ingest handler.
var (
	// errUnauthenticated: no or a wrong credential (401).
	errUnauthenticated = errors.New("unauthenticated")
	// errAuthUnavailable: the credential could not be checked (503), e.g.
	// the API server did not answer the TokenReview.
	errAuthUnavailable = errors.New("authentication unavailable")
	// errForbidden: a valid credential that may not send batches (403).
	errForbidden = errors.New("forbidden")
)

// identity is who sent a request: either a node it may speak for, or any
// node (shared token, auth disabled).
type identity struct {
	node    string
	anyNode bool
}

// mayReport reports whether the identity may send a batch for node.
func (id identity) mayReport(node string) bool { return id.anyNode || id.node == node }

// authenticator checks a request's credentials before its body is read.
type authenticator interface {
	authenticate(ctx context.Context, r *http.Request) (identity, error)
}

// bearer extracts the bearer token of r.
func bearer(r *http.Request) (string, bool) {
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}

// noAuth accepts every request (--auth-mode none, for tests and dev).
type noAuth struct{}

func (noAuth) authenticate(context.Context, *http.Request) (identity, error) {
	return identity{anyNode: true}, nil
}

// tokenFile is the shared bearer token of --auth-mode token. The file is
// re-read when its modification time or size changes, checked at most
// once per recheck, so that a rotated Secret takes effect without a
// restart and without a stat per request.
type tokenFile struct {
	path    string
	recheck time.Duration
	log     *slog.Logger
	now     func() time.Time

	mu      sync.Mutex
	token   []byte
	mtime   time.Time
	size    int64
	checked time.Time
}

// newTokenFile reads path; an unreadable or empty file is an error at start.
func newTokenFile(path string, recheck time.Duration, log *slog.Logger) (*tokenFile, error) {
	t := &tokenFile{path: path, recheck: recheck, log: log, now: time.Now}
	if err := t.load(); err != nil {
		return nil, err
	}
	t.checked = t.now()
	return t, nil
}

func (t *tokenFile) load() error {
	fi, err := os.Stat(t.path)
	if err != nil {
		return fmt.Errorf("--token-file %q: %w", t.path, err)
	}
	b, err := os.ReadFile(t.path)
	if err != nil {
		return fmt.Errorf("--token-file %q: %w", t.path, err)
	}
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return fmt.Errorf("--token-file %q: file is empty", t.path)
	}
	t.token, t.mtime, t.size = b, fi.ModTime(), fi.Size()
	return nil
}

// current returns the token, re-reading the file if it changed. A file
// that became unreadable or empty keeps the previous token (and logs), so
// a botched rotation does not lock every agent out.
func (t *tokenFile) current() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	if now.Sub(t.checked) < t.recheck {
		return t.token
	}
	t.checked = now
	fi, err := os.Stat(t.path)
	if err != nil {
		t.log.Warn("token file unreadable, keeping the previous token", "path", t.path, "err", err)
		return t.token
	}
	if fi.ModTime().Equal(t.mtime) && fi.Size() == t.size {
		return t.token
	}
	old := t.token
	if err := t.load(); err != nil {
		t.log.Warn("token file changed but cannot be used, keeping the previous token", "err", err)
		t.token = old
		return t.token
	}
	t.log.Info("token file reloaded", "path", t.path)
	return t.token
}

func (t *tokenFile) authenticate(_ context.Context, r *http.Request) (identity, error) {
	tok, ok := bearer(r)
	if !ok {
		return identity{}, fmt.Errorf("%w: missing bearer token", errUnauthenticated)
	}
	if subtle.ConstantTimeCompare([]byte(tok), t.current()) != 1 {
		return identity{}, fmt.Errorf("%w: invalid bearer token", errUnauthenticated)
	}
	return identity{anyNode: true}, nil
}

// tokenReviewer asks the API server whether a token is valid; the
// interface is what tokenReview needs of client-go, so tests can use the
// fake clientset's reactor or a plain function.
type tokenReviewer interface {
	Review(ctx context.Context, token string) (authv1.TokenReviewStatus, error)
}

// clientReviewer reviews tokens with the TokenReview API.
type clientReviewer struct {
	client kubernetes.Interface
	// audience, when set, is the audience the agents' projected tokens
	// are issued for; the review then accepts only tokens meant for us.
	audience string
}

// Review creates a TokenReview (authentication.k8s.io/v1).
func (c clientReviewer) Review(ctx context.Context, token string) (authv1.TokenReviewStatus, error) {
	spec := authv1.TokenReviewSpec{Token: token}
	if c.audience != "" {
		spec.Audiences = []string{c.audience}
	}
	tr, err := c.client.AuthenticationV1().TokenReviews().Create(ctx, &authv1.TokenReview{Spec: spec}, metav1.CreateOptions{})
	if err != nil {
		return authv1.TokenReviewStatus{}, err
	}
	if c.audience != "" && tr.Status.Authenticated && !slices.Contains(tr.Status.Audiences, c.audience) {
		tr.Status = authv1.TokenReviewStatus{Error: "token not issued for audience " + c.audience}
	}
	return tr.Status, nil
}

// tokenReview authenticates agents by their ServiceAccount token and binds
// each to the node of its pod: a token stolen from one node cannot report
// flows for another. Results are cached briefly (keyed by the token's
// SHA-256, so no token is kept in memory) since every agent sends a batch
// every few seconds.
type tokenReview struct {
	reviewer       tokenReviewer
	serviceAccount string // "system:serviceaccount:<namespace>:<name>"
	okTTL, failTTL time.Duration
	maxEntries     int
	now            func() time.Time

	mu    sync.Mutex
	cache map[[32]byte]reviewResult
}

type reviewResult struct {
	id      identity
	err     error
	expires time.Time
}

func newTokenReview(rv tokenReviewer, serviceAccount string) *tokenReview {
	return &tokenReview{
		reviewer:       rv,
		serviceAccount: serviceAccount,
		okTTL:          time.Minute,
		failTTL:        5 * time.Second,
		maxEntries:     10_000,
		now:            time.Now,
		cache:          map[[32]byte]reviewResult{},
	}
}

func (t *tokenReview) authenticate(ctx context.Context, r *http.Request) (identity, error) {
	tok, ok := bearer(r)
	if !ok {
		return identity{}, fmt.Errorf("%w: missing bearer token", errUnauthenticated)
	}
	key := sha256.Sum256([]byte(tok))
	now := t.now()
	t.mu.Lock()
	res, hit := t.cache[key]
	t.mu.Unlock()
	if hit && now.Before(res.expires) {
		return res.id, res.err
	}
	id, err := t.review(ctx, tok)
	if errors.Is(err, errAuthUnavailable) {
		return id, err // not cached: the next request tries again
	}
	ttl := t.okTTL
	if err != nil {
		ttl = t.failTTL
	}
	t.mu.Lock()
	if len(t.cache) >= t.maxEntries {
		// Expired or not, start over: the cache is an optimisation and
		// this bound keeps junk tokens from growing it.
		clear(t.cache)
	}
	t.cache[key] = reviewResult{id: id, err: err, expires: now.Add(ttl)}
	t.mu.Unlock()
	return id, err
}

func (t *tokenReview) review(ctx context.Context, tok string) (identity, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := t.reviewer.Review(ctx, tok)
	if err != nil {
		return identity{}, fmt.Errorf("%w: token review: %w", errAuthUnavailable, err)
	}
	if !st.Authenticated {
		msg := st.Error
		if msg == "" {
			msg = "token not authenticated"
		}
		return identity{}, fmt.Errorf("%w: token review: %s", errUnauthenticated, msg)
	}
	if st.User.Username != t.serviceAccount {
		return identity{}, fmt.Errorf("%w: token of %q, want the agent service account %q",
			errForbidden, st.User.Username, t.serviceAccount)
	}
	nodes := st.User.Extra[NodeNameExtra]
	if len(nodes) != 1 || nodes[0] == "" {
		return identity{}, fmt.Errorf("%w: token is not bound to a node (no %s; use a projected token on Kubernetes 1.30+)",
			errForbidden, NodeNameExtra)
	}
	return identity{node: nodes[0]}, nil
}
