// Package packet builds raw IPv4 and IPv6 packets for tests and benchmarks
// that feed the datapath through BPF_PROG_TEST_RUN.
package packet

import (
	"encoding/binary"
	"net/netip"
	"testing"
)

// IPv4 builds an IPv4 packet of total length n carrying TCP or UDP
// (proto 6 or 17) between src and dst, or a bare payload for other
// protocols. Checksums are left zero: the datapath never reads them.
func IPv4(t testing.TB, proto uint8, src, dst netip.AddrPort, n int, fragOff uint16) []byte {
	t.Helper()
	if n < 20+20 {
		t.Fatalf("packet length %d too short", n)
	}
	b := make([]byte, n)
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(n))
	binary.BigEndian.PutUint16(b[6:], fragOff)
	b[8] = 64
	b[9] = proto
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	fillL4(b[20:], proto, src.Port(), dst.Port())
	return b
}

// IPv6 builds an IPv6 packet of total length n, optionally with one
// destination-options extension header before the L4 header.
func IPv6(t testing.TB, proto uint8, src, dst netip.AddrPort, n int, withExt bool) []byte {
	t.Helper()
	if n < 40+8+20 {
		t.Fatalf("packet length %d too short", n)
	}
	b := make([]byte, n)
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], uint16(n-40))
	b[6] = proto
	b[7] = 64
	s, d := src.Addr().As16(), dst.Addr().As16()
	copy(b[8:], s[:])
	copy(b[24:], d[:])
	off := 40
	if withExt {
		b[6] = 60 // destination options
		b[40] = proto
		b[41] = 0 // 8 bytes
		off = 48
	}
	fillL4(b[off:], proto, src.Port(), dst.Port())
	return b
}

func fillL4(b []byte, proto uint8, sport, dport uint16) {
	switch proto {
	case 6:
		binary.BigEndian.PutUint16(b[0:], sport)
		binary.BigEndian.PutUint16(b[2:], dport)
		b[12] = 5 << 4
	case 17:
		binary.BigEndian.PutUint16(b[0:], sport)
		binary.BigEndian.PutUint16(b[2:], dport)
		binary.BigEndian.PutUint16(b[4:], uint16(len(b)))
	}
}
