package series

import (
	"slices"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/internal/remotewrite"
)

// symbol is one distinct label (name and value) of the store's series,
// with its remote-write encoding, made once: a pod's name is a label of
// every pair the pod is part of, and a zone's of hundreds of thousands.
type symbol struct {
	label metrics.Label
	field []byte // the label as a TimeSeries.labels field
	refs  uint32 // series holding it; 0: a free slot
}

// symbols interns labels. A symbol lives as long as a series holds it, so
// the table is bounded by the live series, not by every pod ever seen.
type symbols struct {
	list []symbol
	ids  map[metrics.Label]uint32
	free []uint32
}

func newSymbols() symbols {
	return symbols{ids: map[metrics.Label]uint32{}}
}

// intern returns the symbol of l, holding it once more.
func (t *symbols) intern(l metrics.Label) uint32 {
	if id, ok := t.ids[l]; ok {
		t.list[id].refs++
		return id
	}
	sym := symbol{label: l, field: slices.Clip(remotewrite.AppendLabelField(nil, l.Name, l.Value)), refs: 1}
	var id uint32
	if n := len(t.free); n > 0 {
		id = t.free[n-1]
		t.free = t.free[:n-1]
		t.list[id] = sym
	} else {
		id = uint32(len(t.list))
		t.list = append(t.list, sym)
	}
	t.ids[l] = id
	return id
}

// release lets go of one hold on symbol id, freeing it with the last.
func (t *symbols) release(id uint32) {
	s := &t.list[id]
	if s.refs--; s.refs > 0 {
		return
	}
	delete(t.ids, s.label)
	*s = symbol{}
	t.free = append(t.free, id)
}

// len returns the number of live symbols.
func (t *symbols) len() int { return len(t.ids) }
