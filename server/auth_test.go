package server

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"

	authv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// TestTokenReview runs the TokenReview mode against client-go's fake
// clientset: a real API server cannot run in unit tests here. Its reactor
// plays the API server's part, answering reviews from a table of tokens.
func TestTokenReview(t *testing.T) {
	const sa = "system:serviceaccount:kubezonnet:kubezonnet-agent"
	users := map[string]authv1.UserInfo{
		"tok-a":      {Username: sa, Extra: map[string]authv1.ExtraValue{NodeNameExtra: {"node-a"}}},
		"tok-other":  {Username: "system:serviceaccount:default:default", Extra: map[string]authv1.ExtraValue{NodeNameExtra: {"node-a"}}},
		"tok-nonode": {Username: sa},
	}
	reviews := 0
	apiDown := false
	client := fake.NewClientset()
	client.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		reviews++
		if apiDown {
			return true, nil, errors.New("connection refused")
		}
		tr := a.(k8stesting.CreateAction).GetObject().(*authv1.TokenReview).DeepCopy()
		if u, ok := users[tr.Spec.Token]; ok {
			tr.Status = authv1.TokenReviewStatus{Authenticated: true, User: u}
		} else {
			tr.Status = authv1.TokenReviewStatus{Error: "invalid bearer token"}
		}
		return true, tr, nil
	})
	env := newTestEnv(t, testConfig(), newTokenReview(clientReviewer{client: client}, sa))
	seq := uint64(0)

	for _, tc := range []struct {
		name, token, node string
		apiDown           bool
		code              int
		msg               string
		reviews           int // total TokenReviews after this request
	}{
		{"own node", "tok-a", "node-a", false, 204, "", 1},
		{"cached", "tok-a", "node-a", false, 204, "", 1},
		{"other node", "tok-a", "node-b", false, 403, `credentials of node "node-a" may not report for node "node-b"`, 1},
		{"other service account", "tok-other", "node-a", false, 403, "want the agent service account", 2},
		{"token not bound to a node", "tok-nonode", "node-a", false, 403, "not bound to a node", 3},
		{"unknown token", "tok-x", "node-a", false, 401, "invalid bearer token", 4},
		{"API down", "tok-y", "node-a", true, 503, "connection refused", 5},
		{"API down, not cached", "tok-y", "node-a", true, 503, "connection refused", 6},
	} {
		seq++
		apiDown = tc.apiDown
		// Each request uses a fresh seq so de-duplication never answers.
		b := batch(tc.node, seq)
		code, msg := env.do(t, req{token: tc.token, body: encode(b)})
		if code != tc.code || !strings.Contains(msg, tc.msg) {
			t.Errorf("%s: got %d %q, want %d with %q", tc.name, code, msg, tc.code, tc.msg)
		}
		if reviews != tc.reviews {
			t.Errorf("%s: %d token reviews, want %d", tc.name, reviews, tc.reviews)
		}
	}
	if code, _ := env.do(t, req{token: "-", body: encode(batch("node-a", 999))}); code != http.StatusUnauthorized {
		t.Errorf("missing token: %d, want 401", code)
	}
}

// TestTokenReviewAudience checks that with --token-audience the review asks
// for that audience and refuses tokens issued for another one. The fake
// clientset's reactor plays the API server, which authenticates a token
// only for an audience it was issued for.
func TestTokenReviewAudience(t *testing.T) {
	const sa = "system:serviceaccount:kubezonnet:kubezonnet-agent"
	issuedFor := map[string]string{"tok-ours": "kubezonnet", "tok-api": "https://kubernetes.default.svc"}
	client := fake.NewClientset()
	client.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		tr := a.(k8stesting.CreateAction).GetObject().(*authv1.TokenReview).DeepCopy()
		aud := issuedFor[tr.Spec.Token]
		want := tr.Spec.Audiences
		if len(want) == 0 {
			want = []string{"https://kubernetes.default.svc"}
		}
		for _, w := range want {
			if w == aud {
				tr.Status = authv1.TokenReviewStatus{Authenticated: true, Audiences: []string{aud},
					User: authv1.UserInfo{Username: sa, Extra: map[string]authv1.ExtraValue{NodeNameExtra: {"node-a"}}}}
				return true, tr, nil
			}
		}
		tr.Status = authv1.TokenReviewStatus{Error: "token audiences do not match"}
		return true, tr, nil
	})
	env := newTestEnv(t, testConfig(), newTokenReview(clientReviewer{client: client, audience: "kubezonnet"}, sa))
	if code, msg := env.do(t, req{token: "tok-ours", body: encode(batch("node-a", 1))}); code != 204 {
		t.Errorf("token for our audience: %d %s", code, msg)
	}
	if code, msg := env.do(t, req{token: "tok-api", body: encode(batch("node-a", 2))}); code != 401 || !strings.Contains(msg, "audiences do not match") {
		t.Errorf("token for the API server: %d %s, want 401", code, msg)
	}
}

// reviewFunc is a tokenReviewer made of a function.
type reviewFunc func(ctx context.Context, token string) (authv1.TokenReviewStatus, error)

func (f reviewFunc) Review(ctx context.Context, token string) (authv1.TokenReviewStatus, error) {
	return f(ctx, token)
}

// TestTokenReviewUnavailableWrapsCause checks that a failed review wraps
// both errAuthUnavailable (the answer: 503) and its cause, so a caller can
// still tell a timeout from a refused connection.
func TestTokenReviewUnavailableWrapsCause(t *testing.T) {
	tr := newTokenReview(reviewFunc(func(context.Context, string) (authv1.TokenReviewStatus, error) {
		return authv1.TokenReviewStatus{}, context.DeadlineExceeded
	}), "system:serviceaccount:kubezonnet:kubezonnet-agent")
	_, err := tr.review(t.Context(), "tok")
	if !errors.Is(err, errAuthUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("review error %q wraps errAuthUnavailable %v, context.DeadlineExceeded %v, want both",
			err, errors.Is(err, errAuthUnavailable), errors.Is(err, context.DeadlineExceeded))
	}
}
