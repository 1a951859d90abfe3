package testenv

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// The real `kubezonnet server`, given only its own ServiceAccount's
// kubeconfig (deploy/'s ClusterRole), syncs its informers (it turns ready)
// and authenticates agents with TokenReview: an agent's token may report
// for its own node only.
func TestServerRunsWithItsServiceAccount(t *testing.T) {
	env := sharedEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	bin, err := testutil.BuildKubezonnet(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ports, err := freePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(ports[0])
	srv, err := StartProcess("server", bin, []string{
		"server", "--kubeconfig", env.ServerKubeconfig, "--auth-mode", "tokenreview",
		"--token-audience", AgentTokenAudience,
		"--listen-address", addr, "--log-format", "text",
		// Nothing listens there; readiness only needs an endpoint
		// configured, and nothing is pushed within the test.
		"--remote-write-url", "http://127.0.0.1:9/api/v1/write", "--push-interval", "1h",
	}, ProcessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Kill)

	base := "http://" + addr
	for {
		resp, err := http.Get(base + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case <-srv.Done():
			t.Fatalf("server exited: %v; output:\n%s", srv.Err(), srv.Output())
		case <-ctx.Done():
			t.Fatalf("server never ready (last: %v); output:\n%s", err, srv.Output())
		case <-time.After(100 * time.Millisecond):
		}
	}

	send := func(token, node string) int {
		var enc wire.Encoder
		body := enc.Encode(&wire.Batch{
			Node: node, Incarnation: fmt.Sprintf("testenv-%d", time.Now().UnixNano()), Seq: 1, Time: time.Now(),
		})
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/api/v1/write", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", remotewrite.ContentType)
		req.Header.Set("Content-Encoding", remotewrite.ContentEncoding)
		req.Header.Set(remotewrite.HeaderVersion, remotewrite.ProtocolVersion)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("posting a batch: %v", err)
		}
		msg, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode >= 300 {
			t.Logf("%s for %s: %d %s", token[:min(len(token), 8)], node, resp.StatusCode, bytes.TrimSpace(msg))
		}
		return resp.StatusCode
	}
	// What deploy/'s DaemonSet gives an agent: a token for audience
	// "kubezonnet" bound to the agent's pod.
	token, err := env.AgentToken(ctx, "node-a1")
	if err != nil {
		t.Fatal(err)
	}
	// The same pod's token for the API server's audience: valid, but not
	// meant for the kubezonnet server.
	apiToken, err := env.ControlPlane.ServiceAccountToken(ctx, Namespace, AgentServiceAccount, nil,
		env.Cluster.PodOn(Namespace+"/"+AgentDaemonSet, "node-a1"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, token, node string
		want              int
	}{
		{"no token", "", "node-a1", http.StatusUnauthorized},
		{"garbage token", "not-a-token", "node-a1", http.StatusUnauthorized},
		{"own node", token, "node-a1", http.StatusNoContent},
		{"another node", token, "node-b1", http.StatusForbidden},
		{"API server audience", apiToken, "node-a1", http.StatusUnauthorized},
	}
	for _, tt := range tests {
		if got := send(tt.token, tt.node); got != tt.want {
			t.Errorf("%s: status %d, want %d; server output:\n%s", tt.name, got, tt.want, srv.Output())
		}
	}
}
