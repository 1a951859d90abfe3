package aggregate

import (
	"strconv"

	"github.com/kubezonnet/kubezonnet/internal/metrics"
	"github.com/kubezonnet/kubezonnet/server/resolve"
)

// pairLabels appends the labels of a pod-pair series named name, sorted by
// label name with __name__ first and empty values left out (Prometheus
// treats an empty label as an absent one, and so do we, so that the
// series we push equal the series users query). fold replaces both pod
// names with Overflow, the series of the workload pair.
func pairLabels(dst []metrics.Label, name string, f *Flow, class resolve.Class, fold bool) []metrics.Label {
	srcPod, dstPod := f.Src.Pod, f.Dst.Pod
	if fold {
		srcPod, dstPod = Overflow, Overflow
	}
	dst = append(dst,
		metrics.Label{Name: "__name__", Value: name},
		metrics.Label{Name: "class", Value: class.String()},
		metrics.Label{Name: "dst_kind", Value: f.Dst.Kind.String()},
		metrics.Label{Name: "dst_namespace", Value: f.Dst.Namespace},
		metrics.Label{Name: "dst_pod", Value: dstPod},
		metrics.Label{Name: "dst_workload", Value: f.Dst.Workload},
		metrics.Label{Name: "dst_workload_kind", Value: f.Dst.WorkloadKind},
		metrics.Label{Name: "dst_zone", Value: f.Dst.Zone},
		metrics.Label{Name: "src_kind", Value: f.Src.Kind.String()},
		metrics.Label{Name: "src_namespace", Value: f.Src.Namespace},
		metrics.Label{Name: "src_pod", Value: srcPod},
		metrics.Label{Name: "src_workload", Value: f.Src.Workload},
		metrics.Label{Name: "src_workload_kind", Value: f.Src.WorkloadKind},
		metrics.Label{Name: "src_zone", Value: f.Src.Zone},
	)
	return dropEmpty(dst)
}

// serviceLabels appends the labels of a workload-to-Service series named
// name; fold replaces the source workload with Overflow.
func serviceLabels(dst []metrics.Label, name string, f *Flow, avoidable, fold bool) []metrics.Label {
	workload, kind := f.Src.Workload, f.Src.WorkloadKind
	if fold {
		workload, kind = Overflow, ""
	}
	dst = append(dst,
		metrics.Label{Name: "__name__", Value: name},
		metrics.Label{Name: "avoidable", Value: strconv.FormatBool(avoidable)},
		metrics.Label{Name: "dst_zone", Value: f.Dst.Zone},
		metrics.Label{Name: "service", Value: f.Service.Name},
		metrics.Label{Name: "service_namespace", Value: f.Service.Namespace},
		metrics.Label{Name: "src_namespace", Value: f.Src.Namespace},
		metrics.Label{Name: "src_workload", Value: workload},
		metrics.Label{Name: "src_workload_kind", Value: kind},
		metrics.Label{Name: "src_zone", Value: f.Src.Zone},
		metrics.Label{Name: "traffic_distribution", Value: f.Service.TrafficDistribution},
	)
	return dropEmpty(dst)
}

// zoneLabels appends the labels of a zone-pair series named name.
func zoneLabels(dst []metrics.Label, name, srcZone, dstZone string) []metrics.Label {
	dst = append(dst,
		metrics.Label{Name: "__name__", Value: name},
		metrics.Label{Name: "dst_zone", Value: dstZone},
		metrics.Label{Name: "src_zone", Value: srcZone},
	)
	return dropEmpty(dst)
}

// dropEmpty removes labels with empty values in place.
func dropEmpty(ls []metrics.Label) []metrics.Label {
	out := ls[:0]
	for _, l := range ls {
		if l.Value != "" {
			out = append(out, l)
		}
	}
	return out
}
