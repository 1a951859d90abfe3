#!/usr/bin/env bash
# build-k8s.sh builds the kube-apiserver and etcd that testenv runs, from the
# versions pinned in testenv/tools/go.mod, into testenv/.cache/bin
# (git-ignored). A binary that exists and is newer than tools/go.mod is
# reused. The first build takes several minutes and a few GiB of build
# cache and memory; progress is printed every 15 seconds.
#
# Usage: testenv/build-k8s.sh [--force]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="$here/tools"
out="${KUBEZONNET_TESTENV_BIN:-$here/.cache/bin}"
force=0
[[ "${1:-}" == "--force" ]] && force=1

mkdir -p "$out"
# Two test binaries may ask for a build at once: one builds, the other waits.
exec 9>"$out/.lock"
if ! flock -n 9; then
	echo "build-k8s: another build is running; waiting for it" >&2
	flock 9
fi

version=v1.37.2
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37 -X k8s.io/component-base/version.gitTreeState=clean"

# build NAME PACKAGE [LDFLAGS]: builds PACKAGE of the tools module into
# $out/NAME unless a fresh binary is there already.
build() {
	local name="$1" pkg="$2" flags="${3:-}"
	local bin="$out/$name"
	if [[ $force == 0 && -x "$bin" && "$bin" -nt "$tools/go.mod" ]]; then
		echo "build-k8s: $name is up to date ($bin)" >&2
		return 0
	fi
	local total log start pid rc last
	total=$(cd "$tools" && go list -mod=mod -deps "$pkg" | wc -l)
	log="$(mktemp)"
	start=$SECONDS
	last=$SECONDS
	# About 250 packages a minute on 2 cores from an empty build cache
	# (etcd: 566 in 89 s, kube-apiserver: 2,080 in 487 s).
	echo "build-k8s: building $name from $pkg (up to $total packages: about $(((total + 249) / 250)) minutes on 2 cores from an empty Go build cache, seconds from a warm one)" >&2
	# In its own session (setsid) so that the whole build, compilers
	# included, can be stopped with this script (Ctrl-C, or a test that
	# gives up).
	(cd "$tools" && exec setsid go build -mod=mod -v -trimpath -ldflags "$flags" -o "$bin.tmp" "$pkg") 2>"$log" &
	pid=$!
	trap 'kill -- -"$pid" 2>/dev/null; rm -f "$log" "$bin.tmp"' EXIT
	trap 'exit 130' INT TERM
	while kill -0 "$pid" 2>/dev/null; do
		sleep 1
		if ((SECONDS - last >= 15)); then
			last=$SECONDS
			echo "build-k8s: $name: $(grep -c . "$log" || true) of up to $total packages compiled, $((SECONDS - start))s" >&2
		fi
	done
	rc=0
	wait "$pid" || rc=$?
	trap - EXIT
	if [[ $rc != 0 ]]; then
		echo "build-k8s: building $name failed (exit $rc):" >&2
		grep -v '^[a-zA-Z0-9_./-]*$' "$log" | tail -40 >&2 || true
		rm -f "$log" "$bin.tmp"
		return "$rc"
	fi
	rm -f "$log"
	mv -f "$bin.tmp" "$bin"
	echo "build-k8s: built $bin in $((SECONDS - start))s" >&2
}

build etcd ./etcd
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$ldflags"
# deploy/'s tests render kustomizations with kubectl; build it where the
# machine has none (hack/test.sh then points KUBECTL at it).
if ! command -v kubectl >/dev/null 2>&1; then
	build kubectl k8s.io/kubernetes/cmd/kubectl "$ldflags"
fi
