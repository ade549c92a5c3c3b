//! BackupConfiguration: checked (repository, its Secret and usage policy, the target, what
//! this operator can serve), then given its trigger CronJob with the ServiceAccount and
//! RoleBinding its pods run as, and Stash's conditions and phase.

pub mod build;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use stash_api::BackupConfiguration;
use stash_api::backup_configuration::BackupConfigurationStatus;
use stash_api::common::FromNamespaces;
use stash_api::conditions::{Condition, reasons, set_condition, types};
use stash_api::repository::Repository;

use crate::context::Ctx;
use crate::error::{Error, is_not_found};

pub use build::TriggerSettings;

/// Whether the Repository's `usagePolicy` lets an invoker in `ns` use it; `Err` says why not.
pub async fn usage_allowed(
    ctx: &Ctx,
    repo: &Repository,
    ns: &str,
) -> Result<Result<(), String>, Error> {
    let repo_ns = repo.namespace().unwrap_or_default();
    if repo_ns == ns {
        return Ok(Ok(()));
    }
    let allowed = repo
        .spec
        .usage_policy
        .as_ref()
        .and_then(|p| p.allowed_namespaces.as_ref());
    let refusal = format!(
        "Repository {repo_ns}/{} does not allow use from namespace {ns} (usagePolicy.allowedNamespaces)",
        repo.name_any()
    );
    match allowed.and_then(|a| a.from).unwrap_or_default() {
        FromNamespaces::All => Ok(Ok(())),
        FromNamespaces::Same => Ok(Err(refusal)),
        FromNamespaces::Selector => {
            let Some(sel) = allowed.and_then(|a| a.selector.as_ref()) else {
                return Ok(Err(refusal));
            };
            let namespace = Api::<Namespace>::all(ctx.client.clone())
                .get(ns)
                .await
                .map_err(Error::kube("read the invoker's namespace"))?;
            if crate::target::selector_matches(sel, &namespace.labels().clone()) {
                Ok(Ok(()))
            } else {
                Ok(Err(refusal))
            }
        }
    }
}

#[tracing::instrument(skip_all, fields(kind = "BackupConfiguration", ns = %bc.namespace().unwrap_or_default(), name = %bc.name_any()))]
async fn reconcile(bc: Arc<BackupConfiguration>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.metrics
        .reconciles
        .get_or_create(&crate::metrics::KindLabels {
            kind: "BackupConfiguration",
        })
        .inc();
    let ns = bc.namespace().unwrap_or_default();
    let now = Time(Timestamp::now());
    let generation = bc.meta().generation;
    let mut conds = bc
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut set = |type_: &str, ok: bool, reason: &str, message: String| {
        let mut c = Condition::new(type_, ok, reason, message);
        c.observed_generation = generation;
        set_condition(&mut conds, c, now.clone());
    };
    let mut requeue = Duration::from_secs(300);
    let mut problems = build::validate(&bc);
    // Repository and its Secret.
    let mut backend_ok = false;
    if let Some(r) = &bc.spec.repository {
        let repo_ns = r.namespace.clone().unwrap_or_else(|| ns.clone());
        match Api::<Repository>::namespaced(ctx.client.clone(), &repo_ns)
            .get_opt(&r.name)
            .await
            .map_err(Error::kube("read the Repository"))?
        {
            None => {
                set(
                    types::REPOSITORY_FOUND,
                    false,
                    reasons::REPOSITORY_NOT_AVAILABLE,
                    format!("Repository {repo_ns}/{} does not exist", r.name),
                );
                requeue = Duration::from_secs(5);
            }
            Some(repo) => {
                set(
                    types::REPOSITORY_FOUND,
                    true,
                    reasons::REPOSITORY_AVAILABLE,
                    format!("Repository {repo_ns}/{} exists", r.name),
                );
                let secret = stash_rules::repository::secret_name(&repo.spec.backend).ok();
                let found = match secret {
                    Some(s) => Api::<Secret>::namespaced(ctx.client.clone(), &repo_ns)
                        .get_opt(s)
                        .await
                        .map_err(Error::kube("read the storage Secret"))?
                        .is_some(),
                    None => false,
                };
                if found {
                    set(
                        types::BACKEND_SECRET_FOUND,
                        true,
                        reasons::BACKEND_SECRET_AVAILABLE,
                        format!(
                            "the storage Secret {repo_ns}/{} exists",
                            secret.unwrap_or_default()
                        ),
                    );
                    backend_ok = true;
                } else {
                    set(
                        types::BACKEND_SECRET_FOUND,
                        false,
                        reasons::BACKEND_SECRET_NOT_AVAILABLE,
                        match secret {
                            Some(s) => format!("the storage Secret {repo_ns}/{s} does not exist"),
                            None => format!(
                                "Repository {repo_ns}/{} names no storageSecretName",
                                r.name
                            ),
                        },
                    );
                    requeue = Duration::from_secs(5);
                }
                if let Err(why) = usage_allowed(&ctx, &repo, &ns).await? {
                    problems.push(why);
                }
            }
        }
    }
    {
        if problems.is_empty() {
            set(
                types::VALIDATION_PASSED,
                true,
                reasons::RESOURCE_VALIDATION_PASSED,
                "the spec is valid".into(),
            );
        } else {
            set(
                types::VALIDATION_PASSED,
                false,
                reasons::RESOURCE_VALIDATION_FAILED,
                problems.join("; "),
            );
        }
    }
    let valid = problems.is_empty();
    // The target.
    if let Some(t) = &bc.spec.target
        && valid
    {
        if crate::target::read(&ctx.client, &ns, &t.ref_)
            .await?
            .is_some()
        {
            set(
                types::BACKUP_TARGET_FOUND,
                true,
                reasons::TARGET_AVAILABLE,
                format!("{} {} exists", t.ref_.kind, t.ref_.name),
            );
        } else {
            set(
                types::BACKUP_TARGET_FOUND,
                false,
                reasons::TARGET_NOT_AVAILABLE,
                format!("{} {} does not exist", t.ref_.kind, t.ref_.name),
            );
            requeue = requeue.min(Duration::from_secs(5));
        }
    }
    // The trigger CronJob.
    let cronjobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), &ns);
    let schedule = bc.spec.schedule.clone().filter(|s| !s.is_empty());
    if valid && backend_ok {
        match schedule {
            Some(_) => {
                let settings = TriggerSettings {
                    image: ctx.args.operator_image.clone(),
                    pull_secrets: crate::cli::parse_list(&ctx.args.image_pull_secrets),
                    cluster_role: ctx.args.trigger_cluster_role.clone(),
                };
                let applied = async {
                    crate::context::apply(
                        &Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns),
                        &build::build_service_account(&bc),
                    )
                    .await?;
                    crate::context::apply(
                        &Api::<RoleBinding>::namespaced(ctx.client.clone(), &ns),
                        &build::build_role_binding(&bc, &settings),
                    )
                    .await?;
                    crate::context::apply(&cronjobs, &build::build_cronjob(&bc, &settings)).await
                }
                .await;
                match applied {
                    Ok(()) => set(
                        types::CRON_JOB_CREATED,
                        true,
                        reasons::CRON_JOB_CREATION_SUCCEEDED,
                        format!(
                            "CronJob {} runs on schedule {:?}",
                            build::cronjob_name(&bc),
                            bc.spec.schedule.clone().unwrap_or_default()
                        ),
                    ),
                    Err(e) => {
                        let e = Error::kube("apply the trigger CronJob")(e);
                        set(
                            types::CRON_JOB_CREATED,
                            false,
                            reasons::CRON_JOB_CREATION_FAILED,
                            e.to_string(),
                        );
                        requeue = Duration::from_secs(10);
                    }
                }
            }
            None => {
                // No schedule: sessions come only from users; a CronJob left from an earlier
                // schedule goes.
                match cronjobs
                    .delete(&build::cronjob_name(&bc), &DeleteParams::default())
                    .await
                {
                    Ok(_) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(Error::kube("delete the trigger CronJob")(e)),
                }
                set(
                    types::CRON_JOB_CREATED,
                    true,
                    reasons::CRON_JOB_CREATION_SUCCEEDED,
                    "no schedule: backups run when a BackupSession is created".into(),
                );
            }
        }
    }
    let status = BackupConfigurationStatus {
        observed_generation: generation,
        phase: Some(build::phase(&conds)),
        conditions: Some(conds),
    };
    if bc.status.as_ref() != Some(&status) {
        crate::context::apply_status(
            &ctx.client,
            &*bc,
            &status,
            "write the BackupConfiguration status",
        )
        .await?;
    }
    Ok(Action::requeue(requeue))
}

fn error_policy(_: Arc<BackupConfiguration>, error: &Error, ctx: Arc<Ctx>) -> Action {
    crate::context::after_error(&ctx, "BackupConfiguration", error, 5, 60)
}

/// The BackupConfiguration controller, not yet running. Its cache of configurations is the
/// operator's one: the Repository reconciler reads references from it (`Ctx::configs`).
pub fn new_controller(client: &kube::Client) -> Controller<BackupConfiguration> {
    let api: Api<BackupConfiguration> = Api::all(client.clone());
    let cronjobs: Api<CronJob> = Api::all(client.clone());
    let repos: Api<Repository> = Api::all(client.clone());
    let controller = Controller::new(api, watcher::Config::default().any_semantic())
        .with_config(crate::context::controller_config());
    let configs = controller.store();
    controller
        .owns(cronjobs, watcher::Config::default())
        // A Repository appearing, changing its spec or going away makes its configurations
        // Ready (or not) sooner; its status, which they do not read, does not.
        .watches_stream(
            crate::spec_changes::watch(repos, watcher::Config::default()),
            move |repo: Repository| {
                let ns = repo.namespace().unwrap_or_default();
                let name = repo.name_any();
                configs
                    .state()
                    .into_iter()
                    .filter(|c| {
                        let own = c.namespace().unwrap_or_default();
                        c.spec.repository.as_ref().is_some_and(|r| {
                            r.name == name && r.namespace.as_deref().unwrap_or(&own) == ns
                        })
                    })
                    .map(|c| kube::runtime::reflector::ObjectRef::from_obj(&*c))
                    .collect::<Vec<_>>()
            },
        )
}

pub async fn run(controller: Controller<BackupConfiguration>, ctx: Arc<Ctx>) {
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}
