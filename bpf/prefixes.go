//go:build linux

package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
)

// SetLocalPrefixes replaces the set of prefixes whose sources are counted
// (IPv4 and IPv6 mixed, at most MaxLocalPrefixes). The new set is written
// to the idle slot and then made active with one write, so a packet is
// always checked against a complete set, old or new.
func (d *Datapath) SetLocalPrefixes(prefixes []netip.Prefix) error {
	set, err := prefixSet(prefixes)
	if err != nil {
		return fmt.Errorf("setting local prefixes: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("setting local prefixes: datapath closed")
	}
	// Fill the idle set through the shared mapping, then flip active
	// with an atomic store (a release: the set is visible first). No
	// program reads the idle set: the previous call waited for the last
	// reader of what was then the old set.
	lp := d.prefixes
	idle := 1 - atomic.LoadUint32(&lp.Active)
	lp.Sets[idle] = set
	atomic.StoreUint32(&lp.Active, idle)
	// Wait until no program can still be reading the old set before it
	// may be overwritten by the next call: re-putting a generation's hash
	// map is a map-in-map update, which returns after an RCU grace period
	// (maybe_wait_bpf_programs in kernel/bpf/syscall.c). Prefixes change
	// rarely; a drain, which runs every flush, does not pay for this.
	if err := d.objs.FlowMaps.Put(uint32(0), d.gens[0]); err != nil {
		return fmt.Errorf("waiting for readers of the old prefixes: %w", err)
	}
	return nil
}

// prefixSet encodes prefixes in the kernel's layout: each address as IPv6
// (IPv4 mapped into ::ffff:0:0/96) with its mask, in native byte order, as
// flow.c compares them.
func prefixSet(prefixes []netip.Prefix) (flowPrefixSet, error) {
	var set flowPrefixSet
	if len(prefixes) > MaxLocalPrefixes {
		return set, fmt.Errorf("%d prefixes, at most %d supported", len(prefixes), MaxLocalPrefixes)
	}
	for i, p := range prefixes {
		if !p.IsValid() {
			return set, fmt.Errorf("invalid prefix %q", p.String())
		}
		p = p.Masked()
		bits := p.Bits()
		if p.Addr().Is4() {
			bits += 96
		}
		addr := p.Addr().As16()
		var m [16]byte
		for b := range bits {
			m[b/8] |= 0x80 >> (b % 8)
		}
		set.Prefixes[i].Addr = [2]uint64{binary.NativeEndian.Uint64(addr[:8]), binary.NativeEndian.Uint64(addr[8:])}
		set.Prefixes[i].Mask = [2]uint64{binary.NativeEndian.Uint64(m[:8]), binary.NativeEndian.Uint64(m[8:])}
	}
	set.Count = uint32(len(prefixes))
	return set, nil
}
