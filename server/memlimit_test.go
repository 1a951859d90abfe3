package server

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// noGoLimit is debug.SetMemoryLimit(-1) without GOMEMLIMIT.
const noGoLimit = math.MaxInt64

// fakeRoot writes files (path relative to the root: contents) under a new
// directory standing for "/".
func fakeRoot(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for name, body := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// A cgroup v2 host without a cgroup namespace: the process's cgroup is
// a path under the cgroup2 mount; hybrid hosts mount it at .../unified.
const (
	procCgroup = "1:cpu:/\n4:memory:/kubepods/pod1/ctr\n0::/kubepods/pod1/ctr\n"
	procMounts = "proc /proc proc rw 0 0\ntmpfs /sys/fs/cgroup tmpfs rw 0 0\n" +
		"cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
)

func TestFindMemLimit(t *testing.T) {
	for _, tc := range []struct {
		name    string
		goLimit int64
		files   map[string]string
		want    int64
		from    string // suffix of the source
		wantErr string
	}{
		{name: "GOMEMLIMIT wins over the cgroup", goLimit: 1 << 30,
			files: map[string]string{"sys/fs/cgroup/memory.max": "4294967296\n"}, want: 1 << 30, from: limitFromGo},
		{name: "own cgroup (namespace)", goLimit: noGoLimit,
			files: map[string]string{"sys/fs/cgroup/memory.max": "2147483648\n"}, want: 2 << 30, from: "/sys/fs/cgroup/memory.max"},
		{name: "own cgroup without limit", goLimit: noGoLimit,
			files: map[string]string{"sys/fs/cgroup/memory.max": "max\n"}},
		{name: "own cgroup garbage", goLimit: noGoLimit,
			files: map[string]string{"sys/fs/cgroup/memory.max": "lots\n"}, wantErr: `"lots" is neither a positive byte count nor "max"`},
		{name: "own cgroup zero", goLimit: noGoLimit,
			files: map[string]string{"sys/fs/cgroup/memory.max": "0\n"}, wantErr: `"0" is neither`},
		{name: "no cgroup files at all", goLimit: noGoLimit},
		{name: "GOMEMLIMIT of zero is no limit", goLimit: 0},
		{name: "process cgroup under the cgroup2 mount: least limit up to the mount", goLimit: noGoLimit,
			files: map[string]string{
				"proc/self/cgroup": procCgroup, "proc/mounts": procMounts,
				"sys/fs/cgroup/unified/kubepods/memory.max":          "max\n",
				"sys/fs/cgroup/unified/kubepods/pod1/memory.max":     "2147483648\n",
				"sys/fs/cgroup/unified/kubepods/pod1/ctr/memory.max": "3221225472\n",
			}, want: 2 << 30, from: "/sys/fs/cgroup/unified/kubepods/pod1/memory.max"},
		{name: "process cgroup without limit", goLimit: noGoLimit,
			files: map[string]string{
				"proc/self/cgroup": procCgroup, "proc/mounts": procMounts,
				"sys/fs/cgroup/unified/kubepods/pod1/ctr/memory.max": "max\n",
			}},
		{name: "process cgroup garbage", goLimit: noGoLimit,
			files: map[string]string{
				"proc/self/cgroup": procCgroup, "proc/mounts": procMounts,
				"sys/fs/cgroup/unified/kubepods/pod1/memory.max": "12k\n",
			}, wantErr: `"12k" is neither`},
		{name: "root cgroup (this kind of host): nothing", goLimit: noGoLimit,
			files: map[string]string{"proc/self/cgroup": "4:memory:/x\n0::/\n", "proc/mounts": procMounts}},
		{name: "cgroup v1 only: nothing", goLimit: noGoLimit,
			files: map[string]string{
				"proc/self/cgroup": "4:memory:/kubepods/pod1/ctr\n", "proc/mounts": procMounts,
				"sys/fs/cgroup/unified/kubepods/pod1/ctr/memory.max": "1073741824\n",
			}},
		{name: "no cgroup2 mount: nothing", goLimit: noGoLimit,
			files: map[string]string{
				"proc/self/cgroup": procCgroup, "proc/mounts": "proc /proc proc rw 0 0\n",
				"sys/fs/cgroup/unified/kubepods/pod1/ctr/memory.max": "1073741824\n",
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := fakeRoot(t, tc.files)
			got, err := findMemLimit(tc.goLimit, root)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want it to contain %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.bytes != tc.want || !strings.HasSuffix(got.from, tc.from) {
				t.Errorf("got %d from %q, want %d from ...%q", got.bytes, got.from, tc.want, tc.from)
			}
		})
	}
}

// defaultConfig has the flag defaults that size the fixed heap.
func defaultConfig() Config {
	return Config{
		RemoteWrite: remotewrite.DefaultPusherConfig(),
		Resolve:     resolve.Config{ReleasedIPCacheSize: resolve.DefaultReleasedIPCacheSize},
	}
}

func TestPodPairsFor(t *testing.T) {
	def := defaultConfig()
	for _, tc := range []struct {
		name  string
		limit int64
		cfg   Config
		want  int
		ok    bool
	}{
		// (limit - 48 MiB) x 0.28 - 112.5 MiB of fixed heap, over 348 B.
		{"1 GiB (the Deployment)", 1 << 30, def, 484_318, true},
		{"2 GiB", 2 << 30, def, 1_348_248, true},
		{"4 GiB", 4 << 30, def, 3_076_108, true},
		{"512 MiB", 512 << 20, def, 52_353, true},
		{"256 MiB: below the fixed overhead", 256 << 20, def, minDerivedPodPairs, false},
		{"below the runtime itself", 16 << 20, def, minDerivedPodPairs, false},
		{"absurd limit stays an int", math.MaxInt64 - 1, def, math.MaxInt32, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := podPairsFor(tc.limit, fixedHeapBytes(&tc.cfg))
			if got != tc.want || ok != tc.ok {
				t.Errorf("podPairsFor(%d) = %d, %t; want %d, %t", tc.limit, got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestMaxPodPairs(t *testing.T) {
	cgroup := func(v string) map[string]string { return map[string]string{"sys/fs/cgroup/memory.max": v} }
	for _, tc := range []struct {
		name    string
		flag    int
		goLimit int64
		files   map[string]string
		want    int
		from    string // suffix
		warn    string // "" when none
		limit   int64
		errLeft bool
	}{
		{name: "flag overrides the limit", flag: 42, goLimit: 1 << 30, want: 42, from: limitFromFlag, limit: 1 << 30},
		{name: "flag without limit", flag: 42, goLimit: noGoLimit, want: 42, from: limitFromFlag},
		{name: "flag above what the limit holds", flag: 600_000, goLimit: 1 << 30, want: 600_000, from: limitFromFlag,
			warn: "above the 484318 pairs", limit: 1 << 30},
		{name: "GOMEMLIMIT", goLimit: 1 << 30, files: cgroup("max"), want: 484_318, from: limitFromGo, limit: 1 << 30},
		{name: "cgroup", goLimit: noGoLimit, files: cgroup("2147483648"), want: 1_348_248,
			from: "/sys/fs/cgroup/memory.max", limit: 2 << 30},
		{name: "cgroup max: fallback", goLimit: noGoLimit, files: cgroup("max"), want: fallbackMaxPodPairs,
			from: limitFromFallback, warn: "no memory limit found"},
		{name: "nothing: fallback", goLimit: noGoLimit, want: fallbackMaxPodPairs,
			from: limitFromFallback, warn: "no memory limit found"},
		{name: "garbage: fallback with the error", goLimit: noGoLimit, files: cgroup("garbage"), want: fallbackMaxPodPairs,
			from: limitFromFallback, warn: "memory limit unreadable", errLeft: true},
		{name: "small limit: minimum", goLimit: 256 << 20, want: minDerivedPodPairs, from: limitFromGo,
			warn: "little room for pod pairs", limit: 256 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := defaultConfig()
			cfg.MaxPodPairs = tc.flag
			b := maxPodPairs(&cfg, tc.goLimit, fakeRoot(t, tc.files))
			if b.pairs != tc.want || !strings.HasSuffix(b.from, tc.from) || b.limit != tc.limit {
				t.Errorf("got %d pairs from %q (limit %d), want %d from ...%q (limit %d)",
					b.pairs, b.from, b.limit, tc.want, tc.from, tc.limit)
			}
			if (tc.warn == "") != (b.warn == "") || !strings.Contains(b.warn, tc.warn) {
				t.Errorf("warning %q, want one containing %q", b.warn, tc.warn)
			}
			if (b.err != nil) != tc.errLeft {
				t.Errorf("err %v, want one: %t", b.err, tc.errLeft)
			}
		})
	}
}

// TestPodPairBoundLog: the start log names the bound and its source, and
// a fallback is a warning carrying the error behind it.
func TestPodPairBoundLog(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	cfg := defaultConfig()
	maxPodPairs(&cfg, noGoLimit, fakeRoot(t, map[string]string{"sys/fs/cgroup/memory.max": "garbage"})).logStart(log)
	var recs []map[string]any
	for line := range strings.Lines(buf.String()) {
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		recs = append(recs, r)
	}
	if len(recs) != 2 {
		t.Fatalf("got %d records, want an info and a warning:\n%s", len(recs), buf.String())
	}
	for i, level := range []string{"INFO", "WARN"} {
		r := recs[i]
		if r["level"] != level || r["max_pod_pairs"] != float64(fallbackMaxPodPairs) || r["derived_from"] != limitFromFallback {
			t.Errorf("record %d: %v", i, r)
		}
	}
	if err, _ := recs[1]["err"].(string); !strings.Contains(err, "garbage") {
		t.Errorf("warning's err %q, want the cgroup file's contents", err)
	}
}

// The server collects at defaultGCPercent unless GOGC is set, whatever it
// is set to.
func TestSetGCPercent(t *testing.T) {
	prev := debug.SetGCPercent(-1)
	t.Cleanup(func() { debug.SetGCPercent(prev) })
	for _, tc := range []struct {
		name    string
		env     string
		runtime int // what the runtime took from that GOGC
		want    int
		set     bool
	}{
		{"unset", "", 100, defaultGCPercent, true},
		{"set", "200", 200, 200, false},
		{"set to the default", "100", 100, 100, false},
		{"off", "off", -1, -1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			debug.SetGCPercent(tc.runtime)
			set := setGCPercent(func(k string) string {
				if k != "GOGC" {
					t.Errorf("read %s, want GOGC", k)
				}
				return tc.env
			})
			if set != tc.set {
				t.Errorf("setGCPercent = %v, want %v", set, tc.set)
			}
			if in := debug.SetGCPercent(tc.runtime); in != tc.want {
				t.Errorf("GC percent in force %d, want %d", in, tc.want)
			}
		})
	}
}
