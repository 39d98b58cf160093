"""The certificate authority for agents, and the control plane's server certificate."""

from testhide.controlplane.ca.authority import CertificateAuthority, IssuedCertificate

__all__ = ["CertificateAuthority", "IssuedCertificate"]
