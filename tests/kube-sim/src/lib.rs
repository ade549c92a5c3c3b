//! An in-memory Kubernetes API server for tests and the demo. It knows nothing of Stash.
//! The server arrives with the kube-sim issue.
