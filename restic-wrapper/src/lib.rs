//! Drives the restic CLI as a typed protocol and reads restic repositories natively.
//! Knows nothing about Kubernetes. The commands arrive with the restic-wrapper issue.
