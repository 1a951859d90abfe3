// Package version carries the build's version, set at link time with
// -ldflags "-X github.com/kubezonnet/kubezonnet/internal/version.Version=...".
package version

// Version is the release version, "dev" for untagged builds.
var Version = "dev"

// UserAgent is the User-Agent of every HTTP request kubezonnet makes, so
// receivers can tell agents and servers of different versions apart.
func UserAgent(component string) string { return "kubezonnet-" + component + "/" + Version }
