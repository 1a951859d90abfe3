package resolve

import (
	"fmt"
	"strings"
)

// Class is the traffic class of a (source, destination) pair: what a
// cloud bills it as. Classify computes it, once per flow; the aggregator,
// the series' class label and the flow log all take it from there.
type Class uint8

// The classes. The zero value is same-zone; NumClasses bounds them, so a
// set of classes fits in a byte.
const (
	ClassSameZone Class = iota
	ClassCrossZone
	ClassCrossRegion
	ClassExternal
	ClassUnknown
	NumClasses
)

var classNames = [NumClasses]string{"same-zone", "cross-zone", "cross-region", "external", "unknown"}

// String is the class label value.
func (c Class) String() string {
	if c < NumClasses {
		return classNames[c]
	}
	return fmt.Sprintf("class(%d)", uint8(c))
}

// CrossesZone reports whether traffic of the class crosses a zone
// boundary (and is billed as such): cross-zone and cross-region.
func (c Class) CrossesZone() bool { return c == ClassCrossZone || c == ClassCrossRegion }

// ClassNames lists the label values of every class, in Class order.
func ClassNames() []string { return classNames[:] }

// ParseClass returns the class whose label value is s.
func ParseClass(s string) (Class, error) {
	for i, n := range classNames {
		if n == s {
			return Class(i), nil
		}
	}
	return 0, fmt.Errorf("unknown traffic class %q (want one of %s)", s, strings.Join(classNames[:], ", "))
}

// Classify gives the traffic class of a flow from src to dst.
//
// Order of the rules: traffic with the internet on either side is
// "external" (its price does not depend on the zone of the other side);
// otherwise any unknown side, or a side without a zone, makes it "unknown";
// equal zones are "same-zone"; different zones are "cross-region" when both
// regions are known and differ, and "cross-zone" otherwise (a missing region
// label never inflates a flow to cross-region).
func Classify(src, dst *Endpoint) Class {
	if src == nil || dst == nil {
		return ClassUnknown
	}
	if src.Kind == KindExternal || dst.Kind == KindExternal {
		return ClassExternal
	}
	if src.Kind == KindUnknown || dst.Kind == KindUnknown || !knownZone(src.Zone) || !knownZone(dst.Zone) {
		return ClassUnknown
	}
	if src.Zone == dst.Zone {
		return ClassSameZone
	}
	if knownZone(src.Region) && knownZone(dst.Region) && src.Region != dst.Region {
		return ClassCrossRegion
	}
	return ClassCrossZone
}
