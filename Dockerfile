# One small static image for both roles: `kubezonnet agent` and
# `kubezonnet server` are subcommands of the same binary. Build with
# `make image` (IMAGE and VERSION are make variables).
#
# The eBPF object is committed (bpf/*_bpfel.o, embedded by bpf2go's Go
# file), so the build needs only the Go toolchain: no clang, no kernel
# headers, and CGO is off, so the binary runs on a distroless base.

# The Go version matches the go directive of go.mod (a test checks it).
FROM --platform=$BUILDPLATFORM golang:1.26.7-bookworm AS build
ARG TARGETOS=linux
ARG TARGETARCH=amd64
ARG VERSION=dev
WORKDIR /src
# Modules first, so that source edits do not invalidate the download layer.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath \
      -ldflags "-s -w -X github.com/kubezonnet/kubezonnet/internal/version.Version=${VERSION}" \
      -o /out/kubezonnet .

# distroless/static: CA certificates (for https remote-write endpoints),
# /etc/passwd with the nonroot user, tzdata; no shell, no package manager.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/kubezonnet /kubezonnet
# The server runs as this user; the agent's DaemonSet overrides it with
# uid 0 plus only the capabilities BPF, NET_ADMIN and PERFMON.
USER 65532:65532
ENTRYPOINT ["/kubezonnet"]
