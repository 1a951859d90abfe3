package testenv

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Options configure StartControlPlane. The zero value works.
type Options struct {
	// Binaries to run; empty fields are found (and built if need be) by
	// FindBinaries.
	Binaries Binaries
	// Output receives build progress and the programs' output, each line
	// prefixed with the program's name. Nil keeps only the last lines, to
	// explain a failure.
	Output io.Writer
	// TempDir is where the control plane's directory is made; empty means
	// os.TempDir().
	TempDir string
	// ServiceClusterIPRange is --service-cluster-ip-range; it must not
	// overlap the pod CIDRs. Empty means 10.96.0.0/16,fd00:96::/112
	// (dual-stack Services).
	ServiceClusterIPRange string
	// StartTimeout bounds one attempt to get to /readyz once the binaries
	// exist. Zero means 60s.
	StartTimeout time.Duration
	// ExtraAPIServerArgs are appended to kube-apiserver's command line.
	ExtraAPIServerArgs []string
}

// Issuer is the --service-account-issuer of the control plane, and so the
// default audience of its ServiceAccount tokens.
const Issuer = "https://kubernetes.default.svc.cluster.local"

// ControlPlane is a running etcd and kube-apiserver on 127.0.0.1. Stop
// kills both and removes their files; the kernel kills them too if this
// process dies first.
type ControlPlane struct {
	// URL is the API server's https address.
	URL string
	// CAData holds PEM certificates that verify the API server's
	// self-signed serving certificate.
	CAData []byte
	// Dir holds the control plane's files (etcd data, certificates, keys);
	// Stop removes it.
	Dir string

	adminToken string
	etcd, api  *process
	stopOnce   sync.Once
	stopErr    error
}

// StartControlPlane starts etcd and kube-apiserver and returns once the API
// server's /readyz succeeds. On error nothing is left running. ctx bounds
// the startup (including a first build of the binaries), not the lifetime
// of the control plane: that ends with Stop.
func StartControlPlane(ctx context.Context, opts Options) (*ControlPlane, error) {
	bins := opts.Binaries
	if bins.KubeAPIServer == "" || bins.Etcd == "" {
		found, err := FindBinaries(ctx, opts.Output)
		if err != nil {
			return nil, err
		}
		if bins.KubeAPIServer == "" {
			bins.KubeAPIServer = found.KubeAPIServer
		}
		if bins.Etcd == "" {
			bins.Etcd = found.Etcd
		}
	}
	if opts.ServiceClusterIPRange == "" {
		opts.ServiceClusterIPRange = "10.96.0.0/16,fd00:96::/112"
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 60 * time.Second
	}
	// A port taken between choosing and binding it is the only expected
	// reason to fail; try again with fresh ports.
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		var cp *ControlPlane
		cp, err = startOnce(ctx, bins, opts)
		if err == nil {
			return cp, nil
		}
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	return nil, err
}

func startOnce(ctx context.Context, bins Binaries, opts Options) (_ *ControlPlane, err error) {
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(opts.TempDir, "kubezonnet-testenv-")
	if err != nil {
		return nil, fmt.Errorf("creating the control plane directory: %w", err)
	}
	cp := &ControlPlane{Dir: dir, URL: "https://127.0.0.1:" + strconv.Itoa(ports[2])}
	defer func() {
		if err != nil {
			err = errors.Join(err, cp.Stop())
		}
	}()
	if err := cp.writeCredentials(); err != nil {
		return nil, err
	}
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	cp.etcd, err = startProcess("etcd", bins.Etcd, []string{
		"--name=testenv",
		"--data-dir=" + filepath.Join(dir, "etcd"),
		"--listen-client-urls=" + etcdURL,
		"--advertise-client-urls=" + etcdURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=testenv=" + peerURL,
		"--unsafe-no-fsync=true", // throwaway data: durability buys nothing
		"--log-level=warn",
	}, opts.Output, nil)
	if err != nil {
		return nil, err
	}
	args := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(ports[2]),
		"--cert-dir=" + filepath.Join(dir, "certs"),
		"--token-auth-file=" + filepath.Join(dir, "tokens.csv"),
		"--service-account-key-file=" + filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(dir, "sa.key"),
		"--service-account-issuer=" + Issuer,
		"--service-cluster-ip-range=" + opts.ServiceClusterIPRange,
		// The default reconciler refuses a loopback advertise address.
		"--endpoint-reconciler-type=none",
		"--authorization-mode=RBAC",
		"--allow-privileged=true",
		"--profiling=false",
	}
	cp.api, err = startProcess("kube-apiserver", bins.KubeAPIServer, append(args, opts.ExtraAPIServerArgs...), opts.Output, nil)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, opts.StartTimeout)
	defer cancel()
	if err := cp.waitReady(wctx); err != nil {
		return nil, err
	}
	return cp, nil
}

// writeCredentials writes the static admin token and the ServiceAccount
// signing key pair.
func (cp *ControlPlane) writeCredentials() error {
	var raw [24]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return fmt.Errorf("generating the admin token: %w", err)
	}
	cp.adminToken = hex.EncodeToString(raw[:])
	// token,user,uid,"groups": system:masters bypasses RBAC.
	tokens := cp.adminToken + `,testenv-admin,testenv-admin,"system:masters"` + "\n"
	if err := os.WriteFile(filepath.Join(cp.Dir, "tokens.csv"), []byte(tokens), 0o600); err != nil {
		return fmt.Errorf("writing the token file: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating the service account key: %w", err)
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return fmt.Errorf("encoding the service account key: %w", err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return fmt.Errorf("encoding the service account public key: %w", err)
	}
	files := map[string]*pem.Block{
		"sa.key": {Type: "EC PRIVATE KEY", Bytes: der},
		"sa.pub": {Type: "PUBLIC KEY", Bytes: pub},
	}
	for name, block := range files {
		if err := os.WriteFile(filepath.Join(cp.Dir, name), pem.EncodeToMemory(block), 0o600); err != nil {
			return fmt.Errorf("writing %s: %w", name, err)
		}
	}
	return nil
}

// waitReady polls /readyz until it answers 200, failing early when either
// program exits.
func (cp *ControlPlane) waitReady(ctx context.Context) error {
	certFile := filepath.Join(cp.Dir, "certs", "apiserver.crt")
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var client *http.Client
	last := errors.New("no answer yet")
	for {
		for _, p := range []*process{cp.etcd, cp.api} {
			if p.exited() {
				return p.failure()
			}
		}
		if client == nil {
			// The API server writes its self-signed certificate (and the CA
			// that signed it) before it serves.
			if b, err := os.ReadFile(certFile); err == nil && len(b) > 0 {
				pool := x509.NewCertPool()
				if pool.AppendCertsFromPEM(b) {
					cp.CAData = b
					client = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
						TLSClientConfig: &tls.Config{RootCAs: pool},
					}}
				}
			}
		}
		if client != nil {
			last = cp.probe(ctx, client)
			if last == nil {
				client.CloseIdleConnections()
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for kube-apiserver at %s to be ready: %w (last: %w); last output:\n%s",
				cp.URL, ctx.Err(), last, cp.api.out.String())
		case <-tick.C:
		}
	}
}

func (cp *ControlPlane) probe(ctx context.Context, client *http.Client) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, cp.URL+"/readyz", nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+cp.adminToken)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/readyz: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}

// Pids returns the process ids of etcd and kube-apiserver, for checks that
// nothing outlives Stop.
func (cp *ControlPlane) Pids() []int {
	var pids []int
	for _, p := range []*process{cp.etcd, cp.api} {
		if p != nil {
			pids = append(pids, p.cmd.Process.Pid)
		}
	}
	return pids
}

// Stop kills kube-apiserver and etcd (SIGKILL to their process groups:
// neither holds anything worth a graceful stop) and removes Dir. It is safe
// to call more than once and from several goroutines.
func (cp *ControlPlane) Stop() error {
	cp.stopOnce.Do(func() {
		cp.api.kill()
		cp.etcd.kill()
		cp.stopErr = removeAll(cp.Dir)
	})
	return cp.stopErr
}

// Config returns a client configuration that authenticates with token.
func (cp *ControlPlane) Config(token string) *rest.Config {
	return &rest.Config{
		Host:            cp.URL,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: cp.CAData},
		QPS:             100,
		Burst:           200,
		UserAgent:       "kubezonnet-testenv",
	}
}

// AdminConfig returns a client configuration for the static admin token
// (group system:masters, which RBAC does not restrict). Only the test
// environment itself uses it; kubezonnet's programs get their own
// ServiceAccounts.
func (cp *ControlPlane) AdminConfig() *rest.Config { return cp.Config(cp.adminToken) }

// AdminClient returns a clientset for AdminConfig.
func (cp *ControlPlane) AdminClient() (*kubernetes.Clientset, error) {
	c, err := kubernetes.NewForConfig(cp.AdminConfig())
	if err != nil {
		return nil, fmt.Errorf("creating the admin client: %w", err)
	}
	return c, nil
}

// WriteKubeconfig writes a kubeconfig file (mode 0600) for the API server
// that authenticates with token, as a kubezonnet program or kubectl reads
// it.
func (cp *ControlPlane) WriteKubeconfig(path, token string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["testenv"] = &clientcmdapi.Cluster{Server: cp.URL, CertificateAuthorityData: cp.CAData}
	cfg.AuthInfos["testenv"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["testenv"] = &clientcmdapi.Context{Cluster: "testenv", AuthInfo: "testenv"}
	cfg.CurrentContext = "testenv"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("writing kubeconfig %s: %w", path, err)
	}
	return nil
}

// EnsureServiceAccount creates namespace ns and ServiceAccount name in it
// unless they exist. No controller-manager runs, so nothing else creates
// ServiceAccounts, not even "default" (which the ServiceAccount admission
// plugin requires before a pod without serviceAccountName can be created).
func (cp *ControlPlane) EnsureServiceAccount(ctx context.Context, ns, name string) error {
	c, err := cp.AdminClient()
	if err != nil {
		return err
	}
	return ensureServiceAccount(ctx, c, ns, name)
}

func ensureNamespace(ctx context.Context, c kubernetes.Interface, ns string) error {
	_, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating namespace %s: %w", ns, err)
	}
	return nil
}

func ensureServiceAccount(ctx context.Context, c kubernetes.Interface, ns, name string) error {
	if err := ensureNamespace(ctx, c, ns); err != nil {
		return err
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}
	_, err := c.CoreV1().ServiceAccounts(ns).Create(ctx, sa, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating service account %s/%s: %w", ns, name, err)
	}
	return nil
}

// ServiceAccountToken returns a token for ServiceAccount ns/name from the
// TokenRequest API, valid for an hour. Empty audiences mean the API
// server's own (the token then works as a kubeconfig credential); a
// non-nil boundPod binds the token to that pod, as a projected token in a
// real pod is: a TokenReview then names the pod and its node, and the
// token stops validating once the pod is deleted (after the API server's
// 10 s cache of successful authentications).
func (cp *ControlPlane) ServiceAccountToken(ctx context.Context, ns, name string, audiences []string, boundPod *corev1.Pod) (string, error) {
	c, err := cp.AdminClient()
	if err != nil {
		return "", err
	}
	expiry := int64(3600)
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences:         audiences,
		ExpirationSeconds: &expiry,
	}}
	if boundPod != nil {
		req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{
			Kind: "Pod", APIVersion: "v1", Name: boundPod.Name, UID: boundPod.UID,
		}
	}
	resp, err := c.CoreV1().ServiceAccounts(ns).CreateToken(ctx, name, req, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("requesting a token for service account %s/%s: %w", ns, name, err)
	}
	return resp.Status.Token, nil
}
