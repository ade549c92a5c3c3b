//! `stash-operator trigger`: what a BackupConfiguration's CronJob runs. It creates one
//! BackupSession named `<bc>-<unix seconds>` with Stash's labels and owner, as Stash's
//! `create-backupsession` does; the operator takes it from there.

use kube::Client;
use kube::api::{Api, PostParams};
use stash_api::{BackupConfiguration, BackupSession};

use crate::cli::TriggerArgs;
use crate::error::{Error, is_conflict};

/// The pod's own namespace, from its ServiceAccount token mount.
fn pod_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_owned())
}

pub async fn run(args: TriggerArgs) -> Result<String, Error> {
    if args.invoker_kind != "BackupConfiguration" {
        return Err(Error::Invalid {
            action: "create a BackupSession",
            reason: format!(
                "invoker kind {} is not served yet; only BackupConfiguration",
                args.invoker_kind
            ),
        });
    }
    let client = Client::try_default()
        .await
        .map_err(Error::kube("connect to the API server"))?;
    let ns = args
        .namespace
        .or_else(pod_namespace)
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let bc = Api::<BackupConfiguration>::namespaced(client.clone(), &ns)
        .get(&args.invoker_name)
        .await
        .map_err(Error::kube("read the BackupConfiguration"))?;
    let retry_left = bc
        .spec
        .retry_config
        .as_ref()
        .and_then(|r| r.max_retry)
        .unwrap_or(0);
    let api: Api<BackupSession> = Api::namespaced(client, &ns);
    // One second, one session: a second trigger in the same second finds it and is done.
    let session = crate::backup_session::post::new_session(
        &bc,
        &ns,
        k8s_openapi::jiff::Timestamp::now().as_second(),
        retry_left,
    );
    let name = session.metadata.name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), &session).await {
        Ok(_) => Ok(name),
        Err(e) if is_conflict(&e) => Ok(name),
        Err(e) => Err(Error::kube("create the BackupSession")(e)),
    }
}
