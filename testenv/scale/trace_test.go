package scale

import (
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/kubezonnet/kubezonnet/internal/wire"
)

// TestTrace: a misattributed pod's explanation names its release, the
// first acknowledged report of it (a later one changes nothing), and the
// first batch another node sent its successor (not a later one, and not
// one to another pod), each sent and acknowledged, in milliseconds from
// the release.
func TestTrace(t *testing.T) {
	w := newWorld(Options{Nodes: 2, PodsPerNode: 2, Zones: 2, PeersPerPod: 1}, nil, rand.New(rand.NewPCG(1, 2)))
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	old, next := podName(1, 1, 0), podName(1, 1, 1)
	r := wire.Release{Addr: netip.MustParseAddr("10.65.1.2"), Time: at}
	w.releases[r] = &releaseTrace{pod: old, at: at}

	ms := func(f float64) time.Time { return at.Add(time.Duration(f * float64(time.Millisecond))) }
	w.noteSent([]pair{{podName(0, 1, 0), next}, {podName(0, 1, 0), podName(1, 0, 1)}}, 0, ms(16.7), ms(40))
	w.noteSent([]pair{{podName(0, 0, 0), next}}, 1, ms(30), ms(35))
	w.noteReported([]wire.Release{r}, "batch", ms(0.3), ms(62))
	w.noteReported([]wire.Release{r}, "notice", ms(1), ms(90))

	got := w.trace(old, 58894)
	want := "app-0001-001-g0: 58894 bytes over; released at 03:04:05.000, reported by batch sent +0.3 ms, acknowledged +62.0 ms; " +
		"app-0001-001-g1 first sent flows by node-0000 at +16.7 ms, acknowledged +40.0 ms"
	if got != want {
		t.Errorf("trace:\n got %s\nwant %s", got, want)
	}
	if got := w.trace(next, 1); !strings.Contains(got, "no release of its address") {
		t.Errorf("trace of a pod that released nothing: %s", got)
	}
	w.releases[wire.Release{Addr: r.Addr, Time: at.Add(time.Second)}] = &releaseTrace{pod: next, at: at.Add(time.Second)}
	if got := w.trace(next, 1); !strings.Contains(got, "not reported") {
		t.Errorf("trace of an unreported release: %s", got)
	}
}
