package server

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/kubezonnet/kubezonnet/server/aggregate"
)

// The default --max-pod-pairs (0) follows the memory the server has: the
// Go memory limit (GOMEMLIMIT) or, without one, the cgroup v2 memory limit
// of the process. The model:
//
//	live heap budget = (limit - runtimeResidentBytes) x liveHeapFraction
//	pairs = (live heap budget - fixed heap) / (podPairHeapBytes + checkpointCopyBytes)
//
// where the fixed heap is what does not grow with pod pairs: the
// released-IP cache (--released-ip-cache-size), the informer caches, the
// ingest buffers and the pusher's own series table. In the form pairs = (limit - overhead) x fraction / bytes per
// pair, the overhead is runtimeResidentBytes + fixed heap / liveHeapFraction.
// The figures hold with GOGC=100 and no GOMEMLIMIT at all; the server's
// own GOGC (defaultGCPercent) and GOMEMLIMIT at the limit give the GC more
// room still.
const (
	// podPairHeapBytes is the live heap one pod pair (its bytes and
	// packets series) adds: its series record, index and route entries,
	// its place in a push's capture, and what the pusher keeps.
	// BenchmarkMemoryServer (BENCHMARKS.md) measures the whole heap per
	// series pushed at 1,000,000 pairs (each pair's two series plus the
	// per-pod and zone-pair ones); twice that, rounded up.
	podPairHeapBytes = 300
	// checkpointCopyBytes is what a checkpoint adds per pair while it
	// runs: its view copies each series' counters and times
	// (series.View, 48 B), into the buffer of the checkpoint before.
	checkpointCopyBytes = 48
	// liveHeapFraction is the share of the memory limit (less
	// runtimeResidentBytes) the live heap may take; the rest is the GC's
	// room (with GOGC=100 the heap grows to twice the live heap before a
	// collection) and the transients of pushes, checkpoints and decoded
	// batches that a measured resident size includes. The largest
	// `make scale` profile of BENCHMARKS.md peaks at ~2.5 times the live
	// heap this model gives it (server pinned to one core, where the GC
	// lags furthest behind; GOGC 75, defaultGCPercent). A failing
	// endpoint holds two snapshots' requests instead of one (see
	// remotewrite.Pusher), and GOGC=100 makes ~3.4 times: 0.28 is 1/3.6.
	liveHeapFraction = 0.28
	// runtimeResidentBytes is the server's resident memory before any
	// series or cache: `kubezonnet server` against an unreachable API
	// server (informers empty) measured 45 MB VmRSS, 39 MB of it the
	// binary's text.
	runtimeResidentBytes = 48 << 20
	// informerHeapBytes is the informer caches and address index of a
	// 10,000-pod cluster: 1,064 B of index state and 1,919 B of cached
	// Pod per pod (BENCHMARKS.md "server/resolve", BenchmarkIndexMemory).
	// A larger cluster takes ~30 MB live (~75 MB of the limit) per
	// further 10,000 pods from the GC's room.
	informerHeapBytes = 10_000 * (1_064 + 1_919)
	// releasedIPHeapBytes is the heap of one released address (slot, LRU
	// entry, retained endpoint), times --released-ip-cache-size
	// (BENCHMARKS.md "server/resolve": 486 B).
	releasedIPHeapBytes = 486
	// ingestHeapBytes is an allowance for the pooled request scratch of
	// a few agent batches decoded at once (bodies up to 8 MiB are kept
	// for reuse), the agents' self-metric series and the de-duplication
	// entries.
	ingestHeapBytes = 32 << 20
	// pusherTableHeapBytes is the pusher's state for the series it
	// tracks itself (self-metrics and the agents' series, not the
	// aggregated ones): ~400 B a series with its cached labels, for
	// some 40,000 series (a 1,000-node cluster's agents); the
	// --max-agent-series bound allows more, which a larger cluster takes
	// from the GC's room.
	pusherTableHeapBytes = 16 << 20
	// fallbackMaxPodPairs applies when no memory limit is found: about
	// what a 1 GiB limit derives.
	fallbackMaxPodPairs = 500_000
	// minDerivedPodPairs is the least a limit derives: a limit below the
	// modelled fixed overhead still runs a small cluster, whose informer
	// and released-IP caches are far below the allowances (10,000 pairs
	// are ~3 MB of live heap).
	minDerivedPodPairs = 10_000
)

// defaultGCPercent is the server's GOGC when the environment sets none.
// Nearly all of the server's heap is long-lived series state, which the
// default GOGC=100 lets grow to twice its size before a collection: 75
// keeps the peak at 1.75 times the live heap for a third more
// collections: in `make scale`'s largest profile (BENCHMARKS.md, beside a
// run with GOGC=100) about 10% less peak memory, at a CPU cost per million
// flows within the spread of runs with one setting, and no measurable
// loss of throughput at saturation.
// Prometheus makes the same choice for its head block.
const defaultGCPercent = 75

// setGCPercent applies defaultGCPercent unless the environment's GOGC
// (getenv("GOGC"), which the Go runtime already applied) is set, and
// reports whether it did.
func setGCPercent(getenv func(string) string) bool {
	if getenv("GOGC") != "" {
		return false
	}
	debug.SetGCPercent(defaultGCPercent)
	return true
}

// Sources of a memory limit, as logged in "derived_from".
const (
	limitFromGo       = "GOMEMLIMIT"
	limitFromFlag     = "--max-pod-pairs"
	limitFromFallback = "fallback"
)

// memLimit is a memory limit and where it was found.
type memLimit struct {
	bytes int64  // 0: no limit found
	from  string // limitFromGo or the cgroup file read
}

// findMemLimit returns the Go memory limit when one is set (goLimit is
// debug.SetMemoryLimit(-1), math.MaxInt64 when unset), else the cgroup v2
// memory limit of the process, read from the filesystem under root ("/"
// outside tests). Finding no limit is a zero memLimit and no error; a limit
// file that is neither a byte count nor "max" is an error.
func findMemLimit(goLimit int64, root string) (memLimit, error) {
	if goLimit > 0 && goLimit < math.MaxInt64 {
		return memLimit{bytes: goLimit, from: limitFromGo}, nil
	}
	return cgroupMemLimit(root)
}

// cgroupMemLimit returns the cgroup v2 memory limit of the process. With
// a cgroup namespace (the default for containers on cgroup v2) the
// process's cgroup is /sys/fs/cgroup itself. Otherwise it is the
// "0::<path>" line of /proc/self/cgroup under the cgroup2 mount of
// /proc/mounts; the limit is the least memory.max from there up to the
// mount (a parent's limit binds its children). The root cgroup has no
// memory.max, so the first lookup finds nothing outside a namespace.
func cgroupMemLimit(root string) (memLimit, error) {
	own := filepath.Join(root, "sys/fs/cgroup/memory.max")
	n, ok, err := readMemoryMax(own)
	if err != nil || ok {
		return memLimit{bytes: n, from: own}, err
	}
	cg, err := procCgroupV2(filepath.Join(root, "proc/self/cgroup"))
	if err != nil || cg == "" {
		return memLimit{}, err
	}
	mnt, err := cgroup2Mount(filepath.Join(root, "proc/mounts"))
	if err != nil || mnt == "" {
		return memLimit{}, err
	}
	var lim memLimit
	for dir := path.Clean("/" + cg); ; dir = path.Dir(dir) {
		file := filepath.Join(root, mnt, dir, "memory.max")
		n, ok, err := readMemoryMax(file)
		if err != nil {
			return memLimit{}, err
		}
		if ok && n > 0 && (lim.bytes == 0 || n < lim.bytes) {
			lim = memLimit{bytes: n, from: file}
		}
		if dir == "/" {
			return lim, nil
		}
	}
}

// readMemoryMax reads a cgroup v2 memory.max file: ok is false when the
// file does not exist, n is 0 for "max" (no limit).
func readMemoryMax(file string) (n int64, ok bool, err error) {
	b, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("reading the cgroup memory limit: %w", err)
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return 0, true, nil
	}
	n, err = strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, false, fmt.Errorf("cgroup memory limit %s: %q is neither a positive byte count nor \"max\"", file, s)
	}
	return n, true, nil
}

// procCgroupV2 returns the cgroup v2 path of the "0::<path>" line of a
// /proc/<pid>/cgroup file, "" when there is none (cgroup v1 only, or no
// /proc).
func procCgroupV2(file string) (string, error) {
	b, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("reading the process's cgroup: %w", err)
	}
	for line := range strings.Lines(string(b)) {
		if p, ok := strings.CutPrefix(strings.TrimSpace(line), "0::"); ok {
			return p, nil
		}
	}
	return "", nil
}

// cgroup2Mount returns the mount point of the cgroup2 filesystem listed
// in a /proc/mounts file, "" when there is none.
func cgroup2Mount(file string) (string, error) {
	b, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("reading the mounts: %w", err)
	}
	for line := range strings.Lines(string(b)) {
		// device mountpoint fstype options dump pass
		if f := strings.Fields(line); len(f) >= 3 && f[2] == "cgroup2" {
			return f[1], nil
		}
	}
	return "", nil
}

// fixedHeapBytes is the live heap that does not grow with pod pairs,
// sized by the flags that size it. A workload-to-Service series is a
// record of the same store as a pod pair, so --max-service-series of
// them are budgeted as that many pairs.
func fixedHeapBytes(cfg *Config) int64 {
	services := int64(cfg.MaxServiceSeries)
	if services == 0 {
		services = aggregate.DefaultMaxServiceSeries
	}
	return int64(cfg.Resolve.ReleasedIPCacheSize)*releasedIPHeapBytes +
		informerHeapBytes + ingestHeapBytes + pusherTableHeapBytes + services*podPairHeapBytes
}

// podPairsFor returns the pod pairs a memory limit holds with fixed bytes
// of fixed heap, and false when the limit leaves less than
// minDerivedPodPairs (which it then returns).
func podPairsFor(limit, fixed int64) (int, bool) {
	budget := float64(limit-runtimeResidentBytes)*liveHeapFraction - float64(fixed)
	pairs := budget / (podPairHeapBytes + checkpointCopyBytes)
	if pairs < minDerivedPodPairs {
		return minDerivedPodPairs, false
	}
	return int(min(pairs, math.MaxInt32)), true // an int on any platform
}

// podPairBound is how --max-pod-pairs was settled, for the start log.
type podPairBound struct {
	pairs int
	from  string // limitFromFlag, limitFromGo, a cgroup file or limitFromFallback
	limit int64  // memory limit found; 0: none
	// warn, when set, says why the bound may not fit the memory (err
	// holds the failure behind it, if any).
	warn string
	err  error
}

// maxPodPairs settles the pod-pair bound: --max-pod-pairs when set, else
// derived from the memory limit (goLimit and root as for findMemLimit),
// else fallbackMaxPodPairs.
func maxPodPairs(cfg *Config, goLimit int64, root string) podPairBound {
	lim, err := findMemLimit(goLimit, root)
	fixed := fixedHeapBytes(cfg)
	if cfg.MaxPodPairs > 0 {
		b := podPairBound{pairs: cfg.MaxPodPairs, from: limitFromFlag, limit: lim.bytes}
		if derived, _ := podPairsFor(lim.bytes, fixed); lim.bytes > 0 && cfg.MaxPodPairs > derived {
			b.warn = fmt.Sprintf("--max-pod-pairs is above the %d pairs the memory limit (%s) holds: at full cardinality the server may run out of memory", derived, lim.from)
		}
		return b
	}
	if err != nil {
		return podPairBound{pairs: fallbackMaxPodPairs, from: limitFromFallback, err: err,
			warn: "memory limit unreadable: --max-pod-pairs falls back to a fixed value; set the flag"}
	}
	if lim.bytes == 0 {
		return podPairBound{pairs: fallbackMaxPodPairs, from: limitFromFallback,
			warn: "no memory limit found (GOMEMLIMIT or cgroup v2 memory.max): --max-pod-pairs falls back to a fixed value; set a memory limit or the flag"}
	}
	pairs, ok := podPairsFor(lim.bytes, fixed)
	b := podPairBound{pairs: pairs, from: lim.from, limit: lim.bytes}
	if !ok {
		b.warn = fmt.Sprintf("the memory limit leaves little room for pod pairs beside the fixed overhead (%d MiB of live heap: informer and released-IP caches, ingest buffers, the pusher's own series): using the minimum; raise the limit or set --max-pod-pairs", fixed>>20)
	}
	return b
}

// logStart logs the bound and where it came from, and warns when it may
// not fit the memory.
func (b podPairBound) logStart(log *slog.Logger) {
	attrs := []any{"max_pod_pairs", b.pairs, "derived_from", b.from, "memory_limit_bytes", b.limit}
	log.Info("pod-pair series bounded", attrs...)
	if b.warn == "" {
		return
	}
	if b.err != nil {
		attrs = append(attrs, "err", b.err)
	}
	log.Warn(b.warn, attrs...)
}
