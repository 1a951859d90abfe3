package series_test

import "testing"

// FuzzStore drives a store and the model (store_test.go) through the
// operations its input encodes: one byte picks the operation (create,
// add, expire at a cutoff, capture, remove, install with a restore and a
// Rebuild, drop, set the first push, open or close a view), the next
// ones its arguments. Labels
// come from a small alphabet, so label sets are re-created after their
// expiry, labels are shared between series, and some are declared under
// one hash. After each operation every observable of the store is
// compared with the model: Len, Count per kind, Slots, Kind, Counts,
// Labels, Lookup of every label set, Pushed, Get, View, EachLive, the
// refs Expire and Create return, each Capture's Len and newly, Zero
// before a capture, Symbols against the distinct labels of the records
// not freed yet, and that every view still open gives what it gave
// when taken. Runs stop after maxOps operations, so each
// execution stays fast.
func FuzzStore(f *testing.F) {
	// Opcodes: 0-2 create, 3 add, 4 expire, 5 capture, 6 remove,
	// 7 install, 8 drop, 9 set first push, 10 open a view, 11 close
	// one (see runOps).
	f.Add([]byte{})
	// Create twice, capture, expire everything, capture twice: a stale
	// marker, then the refs freed and reused.
	f.Add([]byte{
		0, 4, 1, 1, 10, 20,
		0, 5, 2, 2, 10, 30,
		5, 0, 0,
		4, 200,
		5, 1, 1,
		0, 4, 1, 0, 5, 40,
		5, 2, 1,
		0, 6, 1, 1, 0, 50,
	})
	// A series expired and re-created before the capture: superseded.
	f.Add([]byte{
		0, 7, 3, 1, 1, 10,
		5, 0, 0,
		4, 50,
		0, 7, 3, 1, 1, 60,
		5, 0, 1,
		5, 0, 2,
	})
	// Installs at chosen refs, colliding hashes, restores, a drop.
	f.Add([]byte{
		7, 36, 1, 1, 100, 2, 1,
		7, 37, 2, 2, 100, 6, 2,
		7, 39, 3, 0, 100, 13, 0,
		7, 5, 1, 2, 100, 1, 0,
		4, 1,
		0, 8, 1, 1, 5, 90,
		5, 1, 0,
		8,
		9, 0, 1,
		6, 0,
		0, 9, 1, 1, 5, 90,
	})
	// Views open across captures: stale markers held until the last
	// closes, then freed by the next capture.
	f.Add([]byte{
		0, 4, 1, 1, 10, 20,
		0, 5, 2, 2, 10, 30,
		5, 0, 0,
		10,
		4, 25,
		5, 1, 1,
		10,
		5, 2, 1,
		0, 6, 1, 1, 0, 50,
		11, 0,
		5, 0, 2,
		11, 0,
		0, 8, 1, 1, 0, 60,
		5, 0, 3,
		0, 9, 1, 1, 0, 70,
	})
	f.Fuzz(func(t *testing.T, data []byte) { runOps(t, data) })
}
