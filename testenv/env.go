package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/kubezonnet/kubezonnet/internal/testnet"
	"github.com/kubezonnet/kubezonnet/internal/testutil"
)

// The identities deploy/ defines for kubezonnet's programs.
const (
	Namespace            = "kubezonnet"
	ServerServiceAccount = "kubezonnet-server"
	AgentServiceAccount  = "kubezonnet-agent"
	// AgentDaemonSet is the agents' DaemonSet in DefaultSpec.
	AgentDaemonSet = "kubezonnet-agent"
	// AgentTokenAudience is the audience of the projected token the
	// agent DaemonSet in deploy/ mounts and presents to the server.
	AgentTokenAudience = "kubezonnet"
)

// DeployManifests returns the files of deploy/ that Env applies: the
// namespace and the least-privilege RBAC of the server and the agent.
func DeployManifests(repoRoot string) []string {
	base := filepath.Join(repoRoot, "deploy", "base")
	return []string{
		filepath.Join(base, "namespace.yaml"),
		filepath.Join(base, "server-rbac.yaml"),
		filepath.Join(base, "agent-rbac.yaml"),
	}
}

// EnvOptions configure StartEnv.
type EnvOptions struct {
	// Spec of the cluster; a zero Spec means DefaultSpec().
	Spec Spec
	// Network builds the topology's network namespaces with
	// testnet.Build, which needs root. Without it the addresses come from
	// PlanTopology and only the API side exists.
	Network bool
	// ControlPlane configures the API server.
	ControlPlane Options
	// Manifests are applied (server-side) before the kubeconfigs are
	// written; nil means DeployManifests of the repository.
	Manifests []string
}

// Env is a running test cluster: the control plane, the network topology,
// the API objects that describe it, and kubeconfigs for kubezonnet's own
// ServiceAccounts. Processes (agents, server, Prometheus) are added on top
// of it by the demo and the end-to-end suite.
type Env struct {
	// Dir holds the kubeconfigs; Close removes it. Callers may put their
	// own files here.
	Dir          string
	ControlPlane *ControlPlane
	Topology     *testnet.Topology
	Cluster      *Cluster
	// ServerKubeconfig authenticates as the server's ServiceAccount
	// (kubezonnet/kubezonnet-server), bound to deploy/'s ClusterRole, not
	// as an administrator.
	ServerKubeconfig string
	// AgentKubeconfig authenticates as the agents' ServiceAccount.
	AgentKubeconfig string

	mu        sync.Mutex
	processes []*Process
}

// StartEnv starts the control plane, builds (or plans) the topology,
// creates the cluster's objects, applies the manifests and writes the
// kubeconfigs. On error everything started is stopped again.
func StartEnv(ctx context.Context, opts EnvOptions) (_ *Env, err error) {
	spec := opts.Spec
	if spec.Region == "" && len(spec.Nodes) == 0 {
		spec = DefaultSpec()
	}
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	manifests := opts.Manifests
	if manifests == nil {
		root, err := testutil.RepoRoot()
		if err != nil {
			return nil, err
		}
		manifests = DeployManifests(root)
	}
	dir, err := os.MkdirTemp(opts.ControlPlane.TempDir, "kubezonnet-env-")
	if err != nil {
		return nil, fmt.Errorf("creating the environment directory: %w", err)
	}
	e := &Env{Dir: dir}
	defer func() {
		if err != nil {
			err = errors.Join(err, e.Close())
		}
	}()

	// The network takes about as long as the API server to come up: build
	// both at once.
	type netResult struct {
		t   *testnet.Topology
		err error
	}
	netDone := make(chan netResult, 1)
	go func() {
		if !opts.Network {
			netDone <- netResult{t: PlanTopology(spec)}
			return
		}
		t, err := testnet.Build(ctx, spec.Testnet())
		netDone <- netResult{t, err}
	}()
	e.ControlPlane, err = StartControlPlane(ctx, opts.ControlPlane)
	nr := <-netDone
	e.Topology = nr.t
	if err != nil {
		return nil, err
	}
	if nr.err != nil {
		return nil, fmt.Errorf("building the network: %w", nr.err)
	}

	// The manifests first: they create the ServiceAccounts the agent
	// DaemonSet's pods run as.
	if err := ApplyManifests(ctx, e.ControlPlane.AdminConfig(), manifests...); err != nil {
		return nil, err
	}
	admin, err := e.ControlPlane.AdminClient()
	if err != nil {
		return nil, err
	}
	if e.Cluster, err = CreateCluster(ctx, admin, spec, e.Topology); err != nil {
		return nil, err
	}
	if opts.Network {
		if err := e.Cluster.ProgramKubeProxy(ctx); err != nil {
			return nil, err
		}
	}
	e.ServerKubeconfig = filepath.Join(dir, "server.kubeconfig")
	e.AgentKubeconfig = filepath.Join(dir, "agent.kubeconfig")
	for path, sa := range map[string]string{e.ServerKubeconfig: ServerServiceAccount, e.AgentKubeconfig: AgentServiceAccount} {
		token, err := e.ControlPlane.ServiceAccountToken(ctx, Namespace, sa, nil, nil)
		if err != nil {
			return nil, err
		}
		if err := e.ControlPlane.WriteKubeconfig(path, token); err != nil {
			return nil, err
		}
	}
	return e, nil
}

// AgentToken returns what the agent on node presents to the server with
// --auth-mode=tokenreview: a token of the agents' ServiceAccount for
// AgentTokenAudience, bound to the agent DaemonSet's pod on that node, so
// that a TokenReview names the node (as a projected token in the real
// DaemonSet does).
func (e *Env) AgentToken(ctx context.Context, node string) (string, error) {
	pod := e.Cluster.PodOn(Namespace+"/"+AgentDaemonSet, node)
	if pod == nil {
		return "", fmt.Errorf("no %s pod on node %q in the cluster spec", AgentDaemonSet, node)
	}
	return e.ControlPlane.ServiceAccountToken(ctx, Namespace, AgentServiceAccount, []string{AgentTokenAudience}, pod)
}

// StartProcess starts a program (see the package function) that Close
// kills if it is still running then.
func (e *Env) StartProcess(name, bin string, args []string, o ProcessOptions) (*Process, error) {
	p, err := StartProcess(name, bin, args, o)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	e.processes = append(e.processes, p)
	e.mu.Unlock()
	return p, nil
}

// Close kills the processes started through the Env, stops the control
// plane, removes the network namespaces and Dir. It is safe to call more
// than once.
func (e *Env) Close() error {
	e.mu.Lock()
	procs := e.processes
	e.processes = nil
	e.mu.Unlock()
	for _, p := range procs {
		p.Kill()
	}
	var errs []error
	if e.ControlPlane != nil {
		errs = append(errs, e.ControlPlane.Stop())
	}
	if e.Topology != nil {
		errs = append(errs, e.Topology.Close())
	}
	errs = append(errs, removeAll(e.Dir))
	return errors.Join(errs...)
}
