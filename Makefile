# kubezonnet developer targets. `make demo` and `make test` are the two
# commands of the README; both install what they need (Debian packages, Go
# modules) on a fresh machine.

GO           ?= go
BIN          ?= bin/kubezonnet
ARCH_TRIPLET ?= $(shell gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
# VERSION is the release this tree builds (the file VERSION: the tag the
# manifests name and `make image` builds).
VERSION      ?= $(shell cat VERSION)
LDFLAGS      := -s -w -X github.com/kubezonnet/kubezonnet/internal/version.Version=$(VERSION)

.PHONY: all deps generate check-generate build test bench demo docs k8s clean scale traffic

all: build

# deps installs the Debian packages the build, the tests and the demo use.
deps:
	./hack/deps.sh

# generate recompiles the eBPF program with the Debian clang into the
# committed bpf2go output (bpf/flow_bpfel.{go,o}).
generate:
	cd bpf && ARCH_TRIPLET=$(ARCH_TRIPLET) $(GO) generate ./...

# check-generate fails when the committed bpf2go output is stale.
check-generate: generate
	git diff --exit-code -- bpf/

# build compiles the binary; hack/step.sh shows progress while the Go
# build cache fills (minutes on a first run) and says when it was reused.
build:
	./hack/step.sh --count "packages compiled" "building $(BIN) (first run: about 3.5 minutes on 2 cores, then seconds)" -- env CGO_ENABLED=0 $(GO) build -v -ldflags '$(LDFLAGS)' -o $(BIN) .

# test runs formatting and vet checks and every test, kernel tests included
# (they need root; as root a skipped privileged test fails the run).
test: deps k8s
	./hack/test.sh

# k8s builds (once, then reuses) the kube-apiserver and etcd the end-to-end
# suite and the demo run, from the versions pinned in testenv/tools.
k8s:
	./testenv/build-k8s.sh

# bench runs the benchmarks of BENCHMARKS.md, writes their raw output to
# benchmarks/ and renders BENCHMARKS.md's tables from it (hack/benchdoc;
# ONLY=bpf,agent for some components). Run it on a quiet machine.
ONLY ?=
bench: deps k8s
	$(GO) run ./hack/benchdoc $(if $(ONLY),-only $(ONLY))

# demo runs the simulated cluster (testenv/demo). On a terminal it stays up
# after the report until Ctrl-C; HOLD=1 keeps it up without one too.
HOLD ?=
demo: deps build
	./hack/step.sh --count "packages compiled" "building the demo, bin/demo (first run: about 1.5 minutes more)" -- $(GO) build -v -o bin/demo ./testenv/demo
	./bin/demo -bin $(BIN) $(if $(HOLD),-wait)

# scale runs the scale simulation (testenv/scale) and prints one table:
# a real kube-apiserver, etcd, server and VictoriaMetrics (or Prometheus,
# -receiver Prometheus), with simulated nodes, pods and agents. No root
# needed. The defaults fit a 2-core machine
# (100 nodes x 30 pods, 100 agents, 20k flows/s offered for a minute, 2 pods
# replaced per second; ~2 minutes). Larger profiles, through SCALE_FLAGS
# (see `go run ./testenv/scale/cmd/scale -h`):
#   300 nodes x 50 pods:   SCALE_FLAGS='-nodes 300 -pods-per-node 50 -agents 300 -batches-per-second 50 -duration 3m'
#   1,000 nodes x 30 pods: SCALE_FLAGS='-nodes 1000 -pods-per-node 30 -agents 1000 -batches-per-second 100 -flows-per-batch 2000 -duration 5m -churn-per-second 10'
# (the API server holds 30,000 pods in ~1.8 GB; pod creation runs at
# ~230 pods/s on 2 cores, so the setup alone takes minutes there).
#   1.9 million series, the server alone on CPU 0 (BENCHMARKS.md):
#     SCALE_FLAGS='-server-cpus 0 -peers-per-pod 250 -batches-per-second 40 -duration 2m -churn-per-second 20'
# (-server-flag passes a flag to the server, e.g. -server-flag=--checkpoint-interval=1h;
# -no-releases makes the agents report no address release: the baseline of
# misattribution under churn).
#   Sustained ingest, every batch encoded before the sending (-pregenerate,
#   no churn), the server alone on CPU 0 (BENCHMARKS.md):
#     SCALE_FLAGS='-server-cpus 0 -nodes 300 -pods-per-node 30 -agents 300 -peers-per-pod 20 -flows-per-batch 2000 -pregenerate -churn-per-second 0 -batches-per-second 1250 -duration 20s'

SCALE_FLAGS ?=
scale: k8s
	$(GO) run ./testenv/scale/cmd/scale $(SCALE_FLAGS)

# traffic runs the traffic benchmark (testenv/traffic) and prints one table:
# iperf3 TCP (offloads on and off) and 64-byte UDP (one flow, 2,000 flows,
# 32,000 new flows/s) through a router namespace, in rounds of three runs:
# nothing attached, an empty program attached the way the agent attaches
# its own, and the real agent, in an order that rotates from round to
# round (UDP: the benchmark and the agent kept off the generator's CPU):
# rates, their noise band, the agent's CPU and RSS, the programs' run time
# and count. TRAFFIC_FLAGS=-conntrack makes the router track connections,
# as kube-proxy nodes do. The agent's counts are checked
# against nftables in every run; any difference fails the target. Needs
# root. The defaults (4 rounds of 10 s runs per case) take about 12
# minutes on 2 cores; a quick look: TRAFFIC_FLAGS='-runs 1 -duration 3s'; one case:
# TRAFFIC_FLAGS='-cases udp-32k-flows-per-s' (see
# `go run ./testenv/traffic/cmd/traffic -h`).
TRAFFIC_FLAGS ?=
traffic: deps build
	$(GO) run ./testenv/traffic/cmd/traffic -bin $(BIN) $(TRAFFIC_FLAGS)

# image builds the container image (Dockerfile: one static binary on
# distroless) and tags it $(IMAGE):$(VERSION); deploy/ manifests name the
# same repository and tag. Needs a running Docker engine (or DOCKER=podman).
DOCKER ?= docker
IMAGE  ?= ghcr.io/kubezonnet/kubezonnet
.PHONY: image
image:
	$(DOCKER) build --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) -f Dockerfile .

# docs regenerates the README's configuration reference from the flags.
docs:
	$(GO) test -run TestREADMEFlags -update .

clean:
	rm -rf bin .test.log
