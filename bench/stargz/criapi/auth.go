// Package v1alpha2 stands in for k8s.io/cri-api/pkg/apis/runtime/v1alpha2, which Debian
// does not package: stargz-snapshotter's resolver imports it for this one type only.
// bench/stargz.py places this file at that import path in a private GOPATH.
package v1alpha2

// AuthConfig holds a registry's credentials, with the fields the resolver reads.
type AuthConfig struct {
	Username      string
	Password      string
	Auth          string
	ServerAddress string
	IdentityToken string
	RegistryToken string
}
