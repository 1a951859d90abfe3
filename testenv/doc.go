// Package testenv runs a whole multi-zone cluster on one Linux host for the
// demo and the end-to-end suite: a real etcd and kube-apiserver on
// 127.0.0.1 (ControlPlane), the Kubernetes objects that describe a
// internal/testnet topology (Nodes with zone labels, workloads with owner
// references, Pods with their IPs: Cluster), and the server's least-privilege
// identity from deploy/ (ApplyManifests, Env.ServerKubeconfig).
//
// The API server and etcd binaries are built from the versions pinned in
// testenv/tools (a separate Go module, so the main module never depends on
// k8s.io/kubernetes) by testenv/build-k8s.sh into testenv/.cache/bin. The
// first build takes minutes; StartControlPlane runs it when the binaries are
// missing, so a fresh machine needs nothing by hand.
//
// No controllers, scheduler or kubelet run: every object a controller would
// create (ReplicaSets, Pods, their status) is created here directly, and
// nothing changes unless this package or a test changes it.
//
// Nothing here needs root. Building the network namespaces of the topology
// (internal/testnet) does; Env does that only when asked to.
package testenv
