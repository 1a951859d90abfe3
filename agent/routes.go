package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/kubezonnet/kubezonnet/internal/netns"
)

// routeEvent is one change to the node's host routes or links that can
// end a pod's hold on an address: a device host route (a /32 or /128 of
// the main table through an interface, the route a ptp CNI gives every
// pod: Calico, Cilium with native routing, kindnet, the ptp plugin) added
// or deleted, or a link deleted (IPv4 removes the routes through a link
// that goes away without a route notification).
type routeEvent struct {
	kind  routeEventKind
	addr  netip.Addr // routeAdded, routeDeleted
	index int32      // the route's interface; the link of linkDeleted
}

type routeEventKind uint8

const (
	routeAdded routeEventKind = iota
	routeDeleted
	linkDeleted
)

// routeEvents is a netlink socket subscribed to the route and link changes
// of one network namespace. Reads go through the runtime's poller, so
// Close ends a blocked read.
type routeEvents struct {
	f   *os.File
	buf []byte
}

// openRouteEvents subscribes to the route and link changes of the network
// namespace at path ("" for the agent's own).
func openRouteEvents(path string) (*routeEvents, error) {
	fd := -1
	err := netns.Do(path, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
		if err != nil {
			return fmt.Errorf("netlink socket: %w", err)
		}
		return unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK,
			Groups: unix.RTMGRP_LINK | unix.RTMGRP_IPV4_ROUTE | unix.RTMGRP_IPV6_ROUTE})
	})
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("subscribing to route changes: %w", err)
	}
	// Room for a burst (a node draining its pods); beyond it the kernel
	// reports ENOBUFS and the caller resynchronises from a dump.
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	return &routeEvents{f: os.NewFile(uintptr(fd), "netlink-route"), buf: make([]byte, 1<<16)}, nil
}

// errEventsLost reports that the kernel dropped notifications (ENOBUFS):
// the caller's view of the routes must be rebuilt from a dump.
var errEventsLost = errors.New("route notifications lost")

// read blocks for the next datagram and returns its events.
func (e *routeEvents) read() ([]routeEvent, error) {
	n, err := e.f.Read(e.buf)
	if err != nil {
		if errors.Is(err, unix.ENOBUFS) {
			return nil, errEventsLost
		}
		return nil, err
	}
	return parseRouteMessages(e.buf[:n])
}

// Close ends the subscription (and a read blocked on it).
func (e *routeEvents) Close() error { return e.f.Close() }

// dumpHostRoutes returns the device host routes of the network namespace
// at path, as routeAdded events.
func dumpHostRoutes(path string) ([]routeEvent, error) {
	var raw []byte
	err := netns.Do(path, func() error {
		var err error
		raw, err = syscall.NetlinkRIB(unix.RTM_GETROUTE, unix.AF_UNSPEC)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listing routes: %w", err)
	}
	return parseRouteMessages(raw)
}

// parseRouteMessages returns the events of the netlink messages in b:
// device host routes of the main table added (RTM_NEWROUTE, in
// notifications and dumps) or deleted, and links deleted. Everything else
// is skipped.
func parseRouteMessages(b []byte) ([]routeEvent, error) {
	msgs, err := syscall.ParseNetlinkMessage(b)
	if err != nil {
		return nil, fmt.Errorf("parsing netlink messages: %w", err)
	}
	var dst []routeEvent
	for i := range msgs {
		m := &msgs[i]
		switch m.Header.Type {
		case unix.RTM_NEWROUTE, unix.RTM_DELROUTE:
			ev, ok := hostRoute(m)
			if !ok {
				continue
			}
			if m.Header.Type == unix.RTM_DELROUTE {
				ev.kind = routeDeleted
			}
			dst = append(dst, ev)
		case unix.RTM_DELLINK:
			if len(m.Data) >= unix.SizeofIfInfomsg {
				// struct ifinfomsg: family, pad, type, index (s32), ...
				dst = append(dst, routeEvent{kind: linkDeleted, index: int32(binary.NativeEndian.Uint32(m.Data[4:8]))})
			}
		}
	}
	return dst, nil
}

// hostRoute reads a route message as a routeAdded event when it is a
// unicast host route of the main table through an interface.
func hostRoute(m *syscall.NetlinkMessage) (routeEvent, bool) {
	if len(m.Data) < unix.SizeofRtMsg {
		return routeEvent{}, false
	}
	// struct rtmsg: family, dst_len, src_len, tos, table, protocol,
	// scope, type, flags (u32).
	family, dstLen, table, typ := m.Data[0], m.Data[1], uint32(m.Data[4]), m.Data[7]
	if typ != unix.RTN_UNICAST || (family == unix.AF_INET && dstLen != 32) ||
		(family == unix.AF_INET6 && dstLen != 128) || (family != unix.AF_INET && family != unix.AF_INET6) {
		return routeEvent{}, false
	}
	attrs, err := syscall.ParseNetlinkRouteAttr(m)
	if err != nil {
		return routeEvent{}, false
	}
	ev := routeEvent{kind: routeAdded}
	hasOIF := false
	for _, a := range attrs {
		switch a.Attr.Type {
		case unix.RTA_DST:
			if addr, ok := netip.AddrFromSlice(a.Value); ok {
				ev.addr = addr.Unmap()
			}
		case unix.RTA_OIF:
			if len(a.Value) >= 4 {
				ev.index, hasOIF = int32(binary.NativeEndian.Uint32(a.Value)), true
			}
		case unix.RTA_TABLE:
			if len(a.Value) >= 4 {
				table = binary.NativeEndian.Uint32(a.Value)
			}
		case unix.RTA_GATEWAY, unix.RTA_MULTIPATH:
			// Through a gateway: another node's route, not a pod's.
			return routeEvent{}, false
		}
	}
	return ev, ev.addr.IsValid() && hasOIF && table == unix.RT_TABLE_MAIN
}
