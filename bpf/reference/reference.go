//go:build linux

package reference

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// Program is the loaded yardstick: its netfilter program and its map.
type Program struct {
	objs referenceObjects
}

// Load loads the program for an IPv4 subnet: it counts packets whose
// source and destination are both in it, as the original agent did.
func Load(subnet netip.Prefix) (*Program, error) {
	if !subnet.Addr().Is4() {
		return nil, fmt.Errorf("reference: subnet %s is not IPv4", subnet)
	}
	spec, err := loadReference()
	if err != nil {
		return nil, fmt.Errorf("reference: %w", err)
	}
	// The program compares the addresses as they lie in the packet, so
	// the constants hold the subnet's bytes in network order.
	addr := subnet.Masked().Addr().As4()
	mask := netip.PrefixFrom(netip.AddrFrom4([4]byte{255, 255, 255, 255}), subnet.Bits()).Masked().Addr().As4()
	var vars referenceVariableSpecs
	if err := spec.Assign(&vars); err != nil {
		return nil, fmt.Errorf("reference: %w", err)
	}
	for _, v := range []struct {
		spec *ebpf.VariableSpec
		val  [4]byte
	}{{vars.Subnet, addr}, {vars.SubnetMask, mask}} {
		if err := v.spec.Set(binary.NativeEndian.Uint32(v.val[:])); err != nil {
			return nil, fmt.Errorf("reference: set %s: %w", v.spec.Name, err)
		}
	}
	var p Program
	if err := spec.LoadAndAssign(&p.objs, nil); err != nil {
		return nil, fmt.Errorf("reference: load: %w", err)
	}
	return &p, nil
}

// Netfilter is the program, for BPF_PROG_TEST_RUN.
func (p *Program) Netfilter() *ebpf.Program { return p.objs.ReferenceNetfilter }

// Bytes returns what the program counted for a pair of addresses, and
// whether it has the pair: the benchmark checks that its packet took the
// existing-flow path.
func (p *Program) Bytes(src, dst netip.Addr) (uint64, bool, error) {
	if !src.Is4() || !dst.Is4() {
		return 0, false, fmt.Errorf("reference: %s -> %s is not an IPv4 pair", src, dst)
	}
	key := referencePair{Saddr: binary.NativeEndian.Uint32(src.AsSlice()), Daddr: binary.NativeEndian.Uint32(dst.AsSlice())}
	var n uint64
	err := p.objs.Pairs.Lookup(&key, &n)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("reference: lookup %s -> %s: %w", src, dst, err)
	}
	return n, true, nil
}

// Close releases the program and its map.
func (p *Program) Close() error { return p.objs.Close() }
