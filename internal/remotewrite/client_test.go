package remotewrite

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang/snappy"
)

func newTestClient(t *testing.T, cfg EndpointConfig, retryOn429 bool) *Client {
	t.Helper()
	pc := DefaultPusherConfig()
	pc.Endpoints = []EndpointConfig{cfg}
	if err := pc.Validate(); err != nil {
		t.Fatal(err)
	}
	c, err := NewClient(pc.Endpoints[0], ClientOptions{RetryOn429: retryOn429, Component: "server"})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestClientStatusDecision(t *testing.T) {
	long := strings.Repeat("y", 5000)
	for _, tc := range []struct {
		name       string
		code       int
		retryAfter string
		retryOn429 bool
		body       string
		wantRetry  bool
		wantAfter  time.Duration
		wantFinal  bool
	}{
		{name: "200", code: 200},
		{name: "204", code: 204},
		{name: "500", code: 500, body: "boom", wantRetry: true},
		{name: "503 retry-after ignored for backoff", code: 503, wantRetry: true},
		{name: "429 retried with Retry-After", code: 429, retryAfter: "7", retryOn429: true, wantRetry: true, wantAfter: 7 * time.Second},
		{name: "429 final when disabled", code: 429, retryAfter: "7", wantFinal: true},
		{name: "400 final", code: 400, body: "out of order sample", wantFinal: true},
		{name: "401 final", code: 401, body: "no", wantFinal: true},
		{name: "404 final", code: 404, wantFinal: true},
		{name: "413 final, body truncated", code: 413, body: long, wantFinal: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				checkRequest(t, r)
				if tc.retryAfter != "" {
					w.Header().Set("Retry-After", tc.retryAfter)
				}
				w.WriteHeader(tc.code)
				_, _ = w.Write([]byte(tc.body))
			}))
			defer srv.Close()
			c := newTestClient(t, EndpointConfig{URL: srv.URL}, tc.retryOn429)
			code, err := c.Store(context.Background(), encodeOne(t))
			if code != tc.code {
				t.Errorf("code %d, want %d", code, tc.code)
			}
			var re retryableError
			var se *StatusError
			switch {
			case tc.wantRetry:
				if !errors.As(err, &re) {
					t.Fatalf("err %v, want retryable", err)
				}
				if re.after != tc.wantAfter {
					t.Errorf("retry after %v, want %v", re.after, tc.wantAfter)
				}
			case tc.wantFinal:
				if errors.As(err, &re) || !errors.As(err, &se) {
					t.Fatalf("err %v, want a final *StatusError", err)
				}
				if len(se.Body) > maxErrBody || !strings.HasPrefix(tc.body, se.Body) {
					t.Errorf("body %q, want the first bytes of %.20q...", se.Body, tc.body)
				}
			default:
				if err != nil {
					t.Fatalf("err %v, want nil", err)
				}
			}
		})
	}
}

func TestClientNetworkErrorIsRetryable(t *testing.T) {
	c := newTestClient(t, EndpointConfig{URL: closedPort(t)}, true)
	code, err := c.Store(context.Background(), encodeOne(t))
	var re retryableError
	if code != 0 || !errors.As(err, &re) {
		t.Errorf("code %d err %v, want 0 and a retryable error", code, err)
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tc := range []struct {
		in   string
		want time.Duration
	}{
		{"", 0},
		{"3", 3 * time.Second},
		{"-3", 0},
		{"soon", 0},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{now.Add(-time.Minute).Format(http.TimeFormat), 0},
	} {
		if got := parseRetryAfter(tc.in, now); got != tc.want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

// TestClientCredentialsFollowTheirFiles checks that rotated secrets are
// used without a restart.
func TestClientCredentialsFollowTheirFiles(t *testing.T) {
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.Header.Get("Authorization"))
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	dir := t.TempDir()
	write := func(name, v string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(v), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pw := write("password", "one\n")
	tok := write("token", "tok-1")
	basic := newTestClient(t, EndpointConfig{URL: srv.URL, BasicAuth: &BasicAuth{Username: "u", PasswordFile: pw}}, true)
	bearer := newTestClient(t, EndpointConfig{URL: srv.URL, BearerTokenFile: tok}, true)
	store := func(c *Client) {
		if _, err := c.Store(context.Background(), encodeOne(t)); err != nil {
			t.Fatal(err)
		}
	}
	store(basic)
	store(bearer)
	write("password", "two-rotated")
	write("token", "tok-2-rotated")
	store(basic)
	store(bearer)
	req, _ := http.NewRequest("GET", "/", nil)
	req.SetBasicAuth("u", "one")
	b1 := req.Header.Get("Authorization")
	req.SetBasicAuth("u", "two-rotated")
	b2 := req.Header.Get("Authorization")
	want := []string{b1, "Bearer tok-1", b2, "Bearer tok-2-rotated"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("Authorization headers %q, want %q", got, want)
	}

	if _, err := NewClient(EndpointConfig{Name: "x", URL: srv.URL, BearerTokenFile: filepath.Join(dir, "missing")}, ClientOptions{RetryOn429: true}); err == nil {
		t.Errorf("missing token file accepted at start-up")
	}
}

func TestClientTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey, caPEM := newCA(t)
	caFile := filepath.Join(dir, "ca.crt")
	writeFile(t, caFile, caPEM)
	certFile, keyFile := filepath.Join(dir, "client.crt"), filepath.Join(dir, "client.key")
	writeFile(t, certFile, nil)
	certPEM, keyPEM := newLeaf(t, ca, caKey, "kubezonnet", false)
	writeFile(t, certFile, certPEM)
	writeFile(t, keyFile, keyPEM)
	srvCert, srvKey := newLeaf(t, ca, caKey, "127.0.0.1", true)
	pair, err := tls.X509KeyPair(srvCert, srvKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)

	var clientCN string
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if len(r.TLS.PeerCertificates) > 0 {
			clientCN = r.TLS.PeerCertificates[0].Subject.CommonName
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{pair}, ClientCAs: pool, ClientAuth: tls.VerifyClientCertIfGiven}
	srv.StartTLS()
	defer srv.Close()

	for _, tc := range []struct {
		name    string
		tls     TLSConfig
		wantErr bool
		wantCN  string
	}{
		{"unknown CA refused", TLSConfig{}, true, ""},
		{"CA file", TLSConfig{CAFile: caFile}, false, ""},
		{"insecure skip verify", TLSConfig{InsecureSkipVerify: true}, false, ""},
		{"client certificate", TLSConfig{CAFile: caFile, CertFile: certFile, KeyFile: keyFile}, false, "kubezonnet"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clientCN = ""
			c := newTestClient(t, EndpointConfig{URL: srv.URL, TLS: tc.tls}, true)
			_, err := c.Store(context.Background(), encodeOne(t))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if clientCN != tc.wantCN {
				t.Errorf("server saw client certificate %q, want %q", clientCN, tc.wantCN)
			}
		})
	}
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func newCA(t *testing.T) (*x509.Certificate, *ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func newLeaf(t *testing.T, ca *x509.Certificate, caKey *ecdsa.PrivateKey, cn string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
}

// encodeOne returns a valid compressed WriteRequest of one series.
func encodeOne(t *testing.T) []byte {
	t.Helper()
	var sb SeriesBuilder
	sb.Label("__name__", "up")
	sb.Label("job", "test")
	sb.Sample(1, time.Now().UnixMilli())
	return snappyEncode(sb.AppendTo(nil))
}

func snappyEncode(b []byte) []byte { return snappy.Encode(nil, b) }
