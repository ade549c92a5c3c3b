//! End-to-end scenarios driven through kubectl against kube-sim (or a real cluster when
//! `STASH_E2E_KUBECONFIG` is set). The scenarios arrive with the controller and agent.
