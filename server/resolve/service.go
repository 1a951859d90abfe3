package resolve

// Service is a Kubernetes Service as the series see it: what a flow
// addressed to the Service's virtual IP (before kube-proxy rewrote it to
// a backend) is attributed to. The resolver hands out one pointer per
// Service and replaces it, never changes it, when a label it carries
// changes, so that consumers may key caches by the pointer as they do by
// Endpoint pointers. Resolver.ReadyInZone reads the endpoint history
// behind a pointer the resolver handed out.
type Service struct {
	Namespace, Name string
	// TrafficDistribution is the Service's spec.trafficDistribution
	// (PreferSameZone, PreferClose, PreferSameNode), empty when unset.
	TrafficDistribution string

	// st is the Service's state in the resolver, nil in a Service the
	// resolver did not hand out.
	st *svcState
}
