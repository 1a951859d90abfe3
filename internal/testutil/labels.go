package testutil

import "github.com/prometheus/prometheus/prompb"

// LabelValue returns the value of the label called name in ls, or "" when
// there is none: tests that decode remote-write requests look labels up
// by name.
func LabelValue(ls []prompb.Label, name string) string {
	for _, l := range ls {
		if l.Name == name {
			return l.Value
		}
	}
	return ""
}
