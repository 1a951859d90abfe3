package resolve

import (
	"strings"
	"testing"
)

func TestClassify(t *testing.T) {
	a1 := podEP("ns", "a", "a", "Pod", "n-a", "z-a", "r-1")
	a1b := podEP("ns", "b", "b", "Pod", "n-a", "z-a", "r-1")
	b1 := podEP("ns", "c", "c", "Pod", "n-b", "z-b", "r-1")
	d2 := nodeEP("n-d", "z-d", "r-2")
	noRegion := staticEP("db", "z-x", "")
	sameZoneStatic := staticEP("db", "z-a", "")
	noZone := unknownPodEP("no_zone", "ns", "w", "n-c")
	for _, tc := range []struct {
		name     string
		src, dst *Endpoint
		want     string
	}{
		{"same zone", a1, a1b, "same-zone"},
		{"same endpoint", a1, a1, "same-zone"},
		{"cross zone", a1, b1, "cross-zone"},
		{"cross region", a1, d2, "cross-region"},
		{"cross region reversed", d2, b1, "cross-region"},
		{"region missing on one side", a1, noRegion, "cross-zone"},
		{"static in the same zone", sameZoneStatic, a1, "same-zone"},
		{"to the internet", a1, externalEP, "external"},
		{"from the internet", externalEP, b1, "external"},
		{"external wins over unknown", noZone, externalEP, "external"},
		{"node without zone", a1, noZone, "unknown"},
		{"unclaimed address", unknownEP("no_pod"), a1, "unknown"},
		{"static without zone value", a1, &Endpoint{Kind: KindStatic, Workload: "x"}, "unknown"},
		{"nil source", nil, a1, "unknown"},
		{"nil destination", a1, nil, "unknown"},
	} {
		if got := Classify(tc.src, tc.dst).String(); got != tc.want {
			t.Errorf("%s: Classify = %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestParseClass: every class's label value parses back to it, and
// anything else is refused with the accepted values named.
func TestParseClass(t *testing.T) {
	for c := range NumClasses {
		got, err := ParseClass(c.String())
		if err != nil || got != c {
			t.Errorf("ParseClass(%q) = %v, %v; want %v", c.String(), got, err, c)
		}
	}
	if _, err := ParseClass("cross_zone"); err == nil || !strings.Contains(err.Error(), "cross-zone") {
		t.Errorf("ParseClass(cross_zone) = %v, want an error naming the classes", err)
	}
	if got := NumClasses.String(); got != "class(5)" {
		t.Errorf("out-of-range class prints %q", got)
	}
	if !ClassCrossZone.CrossesZone() || !ClassCrossRegion.CrossesZone() || ClassSameZone.CrossesZone() || ClassExternal.CrossesZone() || ClassUnknown.CrossesZone() {
		t.Error("CrossesZone holds for exactly cross-zone and cross-region")
	}
}

func TestKindString(t *testing.T) {
	for k, want := range map[Kind]string{KindUnknown: "unknown", KindPod: "pod", KindNode: "node",
		KindStatic: "static", KindExternal: "external", Kind(200): "unknown"} {
		if got := k.String(); got != want {
			t.Errorf("Kind(%d).String() = %q, want %q", k, got, want)
		}
	}
}
