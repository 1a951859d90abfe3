#!/usr/bin/env bash
# Installs the Debian packages kubezonnet's build, tests and demo need, when
# they are missing, and downloads the Go modules of the project and of the
# kube-apiserver and etcd build (testenv/tools) side by side: downloads
# wait on the network, not the CPU. Idempotent; says what it reused.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(make gcc git clang llvm libbpf-dev bpftool iproute2 iputils-ping nftables ethtool iperf3 util-linux prometheus victoria-metrics)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  ./hack/step.sh "installing Debian packages: ${missing[*]}" -- bash -c \
    "$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends ${missing[*]}"
else
  echo "==> Debian packages: all installed already" >&2
fi
# Both downloads must succeed: wait for each by its pid.
./hack/step.sh "downloading Go modules (the project's, and testenv/tools' for kube-apiserver and etcd) into $(go env GOMODCACHE)" -- \
  bash -c 'go mod download & a=$!; (cd testenv/tools && go mod download) & b=$!; wait $a && wait $b'
