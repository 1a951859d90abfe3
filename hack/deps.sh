#!/usr/bin/env bash
# Installs the Debian packages kubezonnet's build, tests and demo need, when
# they are missing. Idempotent and quiet when everything is there.
set -euo pipefail
pkgs=(make gcc git clang llvm libbpf-dev bpftool iproute2 iputils-ping nftables ethtool util-linux prometheus victoria-metrics)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
go mod download
