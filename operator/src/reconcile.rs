//! The reconcile pipeline: read the Role (the record of the shards granted) → validate into a
//! complete [`Plan`] → create the generated API token's Secret where it is missing → check the
//! Secrets the plan names → build (infallible, from the plan alone) →
//! apply with server-side apply → update status (one pure `status::compute` and
//! `status::with_numbers`). Validate and build are pure. The Secrets are read after validation,
//! so an invalid spec costs no Secret reads. IO lives here and only carries out what the pure steps
//! decided; every API call a reconcile makes is asserted by the tests in `reconcile_tests.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::rbac::v1::Role;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{info, warn};

use crate::autopilot;
use crate::crd::{SessionMonitor, SessionMonitorStatus};
use crate::desired::{self, Desired, MANAGER};
use crate::metrics::{Metrics, UsageRead};
use crate::status::{self, DEGRADED, Outcome, READY};
use crate::usage;
use crate::validate::{self, Plan};

/// How often a healthy monitor is re-checked even without a watch event: it restores deleted
/// checkpoint ConfigMaps (not watched) and picks up rotated Secrets.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How often a serving monitor's users and sessions are read into its status: about as often as
/// `kubectl get` is worth refreshing, rarely enough to cost its service and the API server little.
pub const USAGE_REFRESH: Duration = Duration::from_secs(30);
/// A missing Secret is not watched (that would need list/watch on all Secrets): look again.
pub const MISSING_SECRET_RETRY: Duration = Duration::from_secs(60);
const BACKOFF_BASE: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {}", describe(.0))]
    Kube(#[from] kube::Error),
    #[error("applying {kind} {name}: {}", describe(.source))]
    Apply {
        kind: String,
        name: String,
        source: kube::Error,
    },
    /// The operating system gave no random bytes for a new API token (the token itself never
    /// appears in an error).
    #[error("creating Secret {name}: no random bytes for the API token: {reason}")]
    Random { name: String, reason: String },
}

/// What the API server said, as a person reads it: its message, code and reason (kube's own
/// Display adds the whole Status in Debug form, which ends up in `kubectl get` output).
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => other.to_string(),
    }
}

impl Error {
    /// The reconcile metric's `result` and the reason of `Degraded`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "ApiError",
            Error::Apply { .. } | Error::Random { .. } => "ApplyFailed",
        }
    }
}

pub struct Context {
    pub client: Client,
    pub default_image: String,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Where a ready service's users are read from (its `/metrics`).
    usage: usage::Source,
    /// Consecutive failures per monitor, for exponential backoff; cleared by a success.
    failures: Mutex<HashMap<String, u32>>,
    /// Consecutive failed reads of each monitor's service, for the next read's delay.
    usage_failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        default_image: String,
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> Context {
        Context {
            client,
            default_image,
            recorder,
            metrics,
            usage: usage::over_http(),
            failures: Mutex::default(),
            usage_failures: Mutex::default(),
        }
    }

    /// This context reading services' usage from `source` instead (tests).
    pub fn with_usage(mut self, source: usage::Source) -> Context {
        self.usage = source;
        self
    }
}

fn key(monitor: &SessionMonitor) -> String {
    format!(
        "{}/{}",
        monitor.namespace().unwrap_or_default(),
        monitor.name_any()
    )
}

#[tracing::instrument(skip_all, fields(monitor = %key(&monitor), generation = monitor.metadata.generation))]
pub async fn reconcile(monitor: Arc<SessionMonitor>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_duration.start_timer();
    let key = key(&monitor);
    if monitor.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove the children.
        ctx.failures.lock().expect("failures lock").remove(&key);
        ctx.usage_failures
            .lock()
            .expect("usage failures lock")
            .remove(&key);
        return Ok(Action::await_change());
    }
    let namespace = monitor.namespace().unwrap_or_default();
    let result = run_pipeline(&monitor, &ctx, &namespace).await;
    let done = match result {
        Ok(done) => done,
        Err(error) => {
            // Still say why in the status, then let error_policy back off.
            let message = error.to_string();
            let deployment = get_opt::<Deployment>(&ctx.client, &namespace, &monitor.name_any())
                .await
                .ok()
                .flatten();
            let outcome = match &error {
                Error::Apply { .. } | Error::Random { .. } => Outcome::ApplyFailed(message),
                Error::Kube(_) => Outcome::ApiError(message),
            };
            // Counted first: a status write that fails too must not hide the error from the
            // metric the alert SessionMonitorOperatorReconcileErrors watches.
            ctx.metrics
                .reconciles
                .with_label_values(&[error.metric_label()])
                .inc();
            let failed = Done::unapplied(outcome, deployment, Action::await_change());
            update_status(&monitor, &ctx, &failed).await?;
            return Err(error);
        }
    };
    update_status(&monitor, &ctx, &done).await?;
    ctx.metrics
        .reconciles
        .with_label_values(&[done.outcome.reason()])
        .inc();
    ctx.failures.lock().expect("failures lock").remove(&key);
    Ok(done.next)
}

/// What a reconcile found and did, for the status.
struct Done {
    outcome: Outcome,
    deployment: Option<Deployment>,
    endpoint: Option<String>,
    /// The service's numbers; `None` when it is not ready or cannot be read.
    usage: Option<usage::Usage>,
    /// Why the ready service could not be read (status condition `UsageReadFailing`).
    usage_failure: Option<String>,
    /// The shards the applied Role grants; `None` when nothing was applied.
    checkpoint_shards: Option<u16>,
    next: Action,
}

impl Done {
    /// Nothing applied: the status keeps what the previous one granted.
    fn unapplied(outcome: Outcome, deployment: Option<Deployment>, next: Action) -> Done {
        Done {
            outcome,
            deployment,
            endpoint: None,
            usage: None,
            usage_failure: None,
            checkpoint_shards: None,
            next,
        }
    }
}

async fn run_pipeline(
    monitor: &SessionMonitor,
    ctx: &Context,
    namespace: &str,
) -> Result<Done, Error> {
    // The grant as the Role has it, and as the status last said (an older Role may predate the
    // status field): never less than either.
    let role = get_opt::<Role>(&ctx.client, namespace, &monitor.name_any()).await?;
    let checkpoint = validate::checkpoint_name(&monitor.name_any());
    let granted = role
        .as_ref()
        .and_then(|r| autopilot::granted_by(r, &checkpoint))
        .max(monitor.status.as_ref().and_then(|s| s.checkpoint_shards));
    let plan = match validate::validate_granted(monitor, &ctx.default_image, granted) {
        Ok(plan) => plan,
        Err(invalid) => {
            warn!(reason = %invalid, "invalid SessionMonitor spec; nothing applied");
            // The previous Deployment, if any, keeps running the last good spec.
            let deployment =
                get_opt::<Deployment>(&ctx.client, namespace, &monitor.name_any()).await?;
            // A spec change triggers the next reconcile; retrying the same spec cannot help.
            return Ok(Done::unapplied(
                Outcome::InvalidSpec(invalid.message),
                deployment,
                Action::await_change(),
            ));
        }
    };
    let known = ensure_api_token(ctx, monitor, &plan).await?;
    let secret_versions = match check_secrets(&ctx.client, &plan, known).await? {
        Ok(versions) => versions,
        Err(missing) => {
            warn!(reason = %missing, "referenced Secret missing; nothing applied");
            let deployment = get_opt::<Deployment>(&ctx.client, namespace, &plan.name).await?;
            return Ok(Done::unapplied(
                Outcome::MissingSecret(missing),
                deployment,
                Action::requeue(MISSING_SECRET_RETRY),
            ));
        }
    };
    let desired = desired::build(&plan, &secret_versions);
    let (deployment, service, http_service) = apply(ctx, monitor, namespace, &desired).await?;
    let endpoint = status::endpoint(&service, monitor.spec.udp.port);
    // A serving monitor's users, read again at the next reconcile, which comes sooner then.
    let available = deployment
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
        >= 1;
    let (usage, usage_failure, next) = match available {
        true => read_usage(ctx, monitor, namespace, &plan.name, &http_service).await,
        false => (None, None, Action::requeue(RESYNC)),
    };
    let wanted = usage.as_ref().and_then(|u| u.checkpoint_shards_wanted);
    let decision = autopilot::decide(plan.checkpoint_shards, plan.max_checkpoint_shards, wanted);
    let checkpoint_shards = grant_shards(ctx, monitor, plan, &secret_versions, decision).await?;
    Ok(Done {
        outcome: Outcome::Applied,
        deployment: Some(deployment),
        endpoint,
        usage,
        usage_failure,
        checkpoint_shards: Some(checkpoint_shards),
        next,
    })
}

/// Reads a serving monitor's numbers from its service's `/metrics`, through the HTTP Service's
/// cluster IP (no DNS lookup: under load the cluster DNS was one more thing that could make a
/// read miss its deadline); the numbers or why not, and when to read again.
async fn read_usage(
    ctx: &Context,
    monitor: &SessionMonitor,
    namespace: &str,
    name: &str,
    http_service: &Service,
) -> (Option<usage::Usage>, Option<String>, Action) {
    let host = http_service
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "None")
        .unwrap_or_else(|| format!("{}.{namespace}.svc", desired::http_service_name(name)));
    let read = (ctx.usage)(host, monitor.spec.metrics.port).await;
    let key = key(monitor);
    let mut failures = ctx.usage_failures.lock().expect("usage failures lock");
    match read {
        Ok(usage) => {
            ctx.metrics.usage_reads(UsageRead::Ok).inc();
            if failures.remove(&key).is_some() {
                tracing::info!("the service's /metrics answers again");
            }
            (Some(usage), None, Action::requeue(USAGE_REFRESH))
        }
        Err(error) => {
            ctx.metrics.usage_reads(UsageRead::Failed).inc();
            let count = failures.entry(key).or_insert(0);
            *count = count.saturating_add(1);
            let retry = usage::retry_after(*count, USAGE_REFRESH);
            warn!(%error, failures = *count, retry_in = ?retry, "cannot read the service's numbers; status.activeUsers and the shard autopilot wait for them");
            let message = format!(
                "{error} ({} reads in a row failed; next in {}s)",
                *count,
                retry.as_secs()
            );
            (None, Some(message), Action::requeue(retry))
        }
    }
}

/// Carries out the shard autopilot's `decision`; the shards granted afterwards. A raise applies
/// the Role and the new checkpoint ConfigMaps before the configuration that lets the service use
/// them; the Deployment is unchanged (the shard count is not in the pod's checksum), so the pod
/// keeps running and takes the count from its mounted file.
async fn grant_shards(
    ctx: &Context,
    monitor: &SessionMonitor,
    plan: Plan,
    secret_versions: &BTreeMap<String, String>,
    decision: autopilot::Decision,
) -> Result<u16, Error> {
    let count = |decision: autopilot::Decision| {
        if let Some(label) = decision.label() {
            ctx.metrics
                .checkpoint_autopilot
                .with_label_values(&[label.as_str()])
                .inc();
        }
    };
    let max = plan.max_checkpoint_shards;
    match decision {
        autopilot::Decision::Keep => Ok(plan.checkpoint_shards),
        autopilot::Decision::AtMaximum { granted, wanted } => {
            // Said once per figure: the status keeps the last one the service gave.
            let said = monitor
                .status
                .as_ref()
                .and_then(|s| s.checkpoint_shards_wanted);
            if said != Some(wanted) {
                count(decision);
                let note = format!(
                    "the checkpoint calls for {wanted} shard ConfigMaps and all \
                     {granted} allowed by spec.checkpoint.maxShards are granted: raise \
                     spec.checkpoint.maxShards before checkpoint writes fail"
                );
                warn!(wanted, granted, "{note}");
                publish(
                    ctx,
                    monitor,
                    EventType::Warning,
                    "CheckpointShardsAtMaximum",
                    note,
                )
                .await;
            }
            Ok(granted)
        }
        autopilot::Decision::Raise { from, to, wanted } => {
            let raised = plan.with_checkpoint_shards(to);
            let desired = desired::build(&raised, secret_versions);
            let namespace = raised.namespace.as_str();
            apply_one(&ctx.client, namespace, &desired.role).await?;
            // `NAME` first, then shards 1 … `from`, which exist already.
            for checkpoint in desired
                .checkpoint_config_maps
                .iter()
                .skip(1 + usize::from(from))
            {
                apply_one(&ctx.client, namespace, checkpoint).await?;
            }
            apply_one(&ctx.client, namespace, &desired.config_map).await?;
            count(decision);
            let (kind, short) = if decision.label() == Some(autopilot::Label::RaisedToMaximum) {
                let short = format!(
                    "; spec.checkpoint.maxShards ({max}) stops it below the {wanted} wanted"
                );
                (EventType::Warning, short)
            } else {
                (EventType::Normal, String::new())
            };
            let note = format!(
                "the checkpoint calls for {wanted} shard ConfigMaps: granted {to} (was {from}){short}. \
                 The service takes the new count from its mounted configuration within a minute \
                 or two, without a restart"
            );
            info!(from, to, wanted, "checkpoint shards raised");
            publish(ctx, monitor, kind, "CheckpointShardsRaised", note).await;
            Ok(to)
        }
    }
}

/// Records an Event on the monitor; a failure to record is logged, never fatal.
async fn publish(
    ctx: &Context,
    monitor: &SessionMonitor,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &monitor.object_ref(&())).await {
        warn!(error = %e, reason, "could not record Event");
    }
}

/// The generated API token's Secret (`spec.apiAuth.generateToken`), created where it is
/// missing; `None` when the spec does not ask for one. Never written when it exists, so the
/// token stays the same across reconciles and operator restarts; a deleted one is replaced by a
/// new token, whose resourceVersion then rolls the pod.
async fn ensure_api_token(
    ctx: &Context,
    monitor: &SessionMonitor,
    plan: &Plan,
) -> Result<Option<Secret>, Error> {
    let Some(token) = plan.api_token.as_ref().filter(|t| t.generated) else {
        return Ok(None);
    };
    let name = token.secret.secret.clone();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    if let Some(existing) = api.get_opt(&name).await? {
        return Ok(Some(existing));
    }
    let value = new_token().map_err(|e| Error::Random {
        name: name.clone(),
        reason: e.to_string(),
    })?;
    let Some(secret) = desired::generated_token_secret(plan, value) else {
        return Ok(None);
    };
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    // A create, not an apply: it can never overwrite a token someone (another replica, an
    // earlier attempt whose answer was lost) created meanwhile.
    match api.create(&params, &secret).await {
        Ok(created) => {
            info!(secret = %name, "created the API token Secret");
            let note = format!(
                "created Secret {name} with a new API token (key {:?}); the pod is (re)started \
                 with it",
                token.secret.key
            );
            publish(ctx, monitor, EventType::Normal, "ApiTokenCreated", note).await;
            Ok(Some(created))
        }
        Err(kube::Error::Api(status)) if status.is_already_exists() || status.code == 409 => {
            Ok(api.get_opt(&name).await?)
        }
        Err(source) => Err(Error::Apply {
            kind: "Secret".into(),
            name,
            source,
        }),
    }
}

/// 32 bytes from the operating system's generator, hex-encoded: 64 characters, well over the
/// service's minimum of 16 printable ones.
fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `Ok(Err(message))` when a Secret or key is missing; the resourceVersions otherwise. `known`:
/// a Secret this reconcile already read (the generated token's), not read again.
async fn check_secrets(
    client: &Client,
    plan: &Plan,
    known: Option<Secret>,
) -> Result<Result<BTreeMap<String, String>, String>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &plan.namespace);
    let mut versions = BTreeMap::new();
    let mut seen: BTreeMap<String, Option<Secret>> =
        known.into_iter().map(|s| (s.name_any(), Some(s))).collect();
    for key in &plan.secret_keys() {
        if !seen.contains_key(key.secret.as_str()) {
            let secret = api.get_opt(&key.secret).await?;
            seen.insert(key.secret.clone(), secret);
        }
        let Some(secret) = &seen[key.secret.as_str()] else {
            return Ok(Err(format!(
                "Secret {:?} does not exist in namespace {:?}",
                key.secret, plan.namespace
            )));
        };
        let has_key = secret
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key(&key.key))
            || secret
                .string_data
                .as_ref()
                .is_some_and(|d| d.contains_key(&key.key));
        if !has_key {
            return Ok(Err(format!(
                "Secret {:?} has no key {:?}",
                key.secret, key.key
            )));
        }
        versions.insert(
            key.secret.clone(),
            secret.resource_version().unwrap_or_default(),
        );
    }
    Ok(Ok(versions))
}

async fn apply(
    ctx: &Context,
    monitor: &SessionMonitor,
    namespace: &str,
    desired: &Desired,
) -> Result<(Deployment, Service, Service), Error> {
    let client = &ctx.client;
    apply_one(client, namespace, &desired.service_account).await?;
    apply_one(client, namespace, &desired.role).await?;
    apply_one(client, namespace, &desired.role_binding).await?;
    apply_one(client, namespace, &desired.config_map).await?;
    for checkpoint in &desired.checkpoint_config_maps {
        apply_one(client, namespace, checkpoint).await?;
    }
    let service = apply_one(client, namespace, &desired.service).await?;
    let http_service = apply_one(client, namespace, &desired.http_service).await?;
    // Last, so that everything the pod mounts and uses exists when it starts.
    let deployment = apply_one(client, namespace, &desired.deployment).await?;
    apply_service_monitor(ctx, monitor, namespace, desired).await?;
    Ok((deployment, service, http_service))
}

async fn apply_one<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: K::kind(&()).into_owned(),
        name,
        source,
    })
}

fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// Applies the ServiceMonitor where the Prometheus Operator's API exists, and removes one this
/// monitor created once it is switched off. Without the API, a requested ServiceMonitor is
/// reported as a Warning Event.
async fn apply_service_monitor(
    ctx: &Context,
    monitor: &SessionMonitor,
    namespace: &str,
    desired: &Desired,
) -> Result<(), Error> {
    let available = match ctx
        .client
        .list_api_group_resources(desired::SERVICE_MONITOR_API_VERSION)
        .await
    {
        Ok(list) => list.resources.iter().any(|r| r.name == "servicemonitors"),
        // Older API servers answer an absent group with a plain-text 404, without a reason.
        Err(kube::Error::Api(status)) if status.is_not_found() || status.code == 404 => false,
        Err(e) => return Err(e.into()),
    };
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), namespace, &service_monitor_resource());
    let name = monitor.name_any();
    match (&desired.service_monitor, available) {
        (Some(object), true) => {
            api.patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(object),
            )
            .await
            .map_err(|source| Error::Apply {
                kind: "ServiceMonitor".into(),
                name: name.clone(),
                source,
            })?;
        }
        (Some(_), false) => {
            let note = "spec.metrics.serviceMonitor.enabled, but the monitoring.coreos.com/v1 API \
                        (Prometheus Operator) is not installed: no ServiceMonitor created";
            warn!("{note}");
            let reason = "ServiceMonitorUnavailable";
            publish(ctx, monitor, EventType::Warning, reason, note.into()).await;
        }
        (None, true) => {
            // Only a ServiceMonitor this monitor controls: one of the same name that someone
            // else made stays.
            let Some(existing) = api.get_opt(&name).await? else {
                return Ok(());
            };
            let ours = existing
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| {
                    o.controller == Some(true) && Some(&o.uid) == monitor.metadata.uid.as_ref()
                });
            if !ours {
                return Ok(());
            }
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: existing.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => info!("ServiceMonitor switched off: deleted"),
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        (None, false) => {}
    }
    Ok(())
}

async fn get_opt<K>(client: &Client, namespace: &str, name: &str) -> Result<Option<K>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    Ok(Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?)
}

/// Writes the status when it changed, and records an Event for each transition an
/// administrator would want in `kubectl describe`.
async fn update_status(monitor: &SessionMonitor, ctx: &Context, done: &Done) -> Result<(), Error> {
    let previous = monitor.status.as_ref();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let next = status::compute(
        &done.outcome,
        monitor.metadata.generation,
        done.deployment.as_ref(),
        done.endpoint.clone(),
        previous,
        now.clone(),
    );
    let next = status::with_numbers(next, done.checkpoint_shards, done.usage.as_ref(), previous);
    let next = status::with_usage_read(next, done.usage_failure.as_deref(), previous, now);
    for event in transitions(previous, &next) {
        if let Err(e) = ctx.recorder.publish(&event, &monitor.object_ref(&())).await {
            warn!(error = %e, reason = %event.reason, "could not record Event");
        }
    }
    if previous == Some(&next) {
        return Ok(());
    }
    let api: Api<SessionMonitor> =
        Api::namespaced(ctx.client.clone(), &monitor.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": SessionMonitor::api_version(&()),
        "kind": SessionMonitor::kind(&()),
        "status": next,
    });
    api.patch_status(
        &monitor.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Events for condition changes: Degraded appearing (with its reason) or clearing, Ready.
fn transitions(previous: Option<&SessionMonitorStatus>, next: &SessionMonitorStatus) -> Vec<Event> {
    let was = |t| status::condition(previous, t).map(|c| (c.status.clone(), c.reason.clone()));
    let now = |t| status::condition(Some(next), t).expect("computed conditions are complete");
    let mut events = Vec::new();
    let degraded = now(DEGRADED);
    if was(DEGRADED) != Some((degraded.status.clone(), degraded.reason.clone())) {
        if degraded.status == "True" {
            events.push(Event {
                type_: EventType::Warning,
                reason: degraded.reason.clone(),
                note: Some(truncate(&degraded.message, 1000)),
                action: "Reconcile".into(),
                secondary: None,
            });
        } else if was(DEGRADED).is_some_and(|(s, _)| s == "True") {
            events.push(Event {
                type_: EventType::Normal,
                reason: "Recovered".into(),
                note: Some("the spec is valid and every object is applied".into()),
                action: "Reconcile".into(),
                secondary: None,
            });
        }
    }
    let ready = now(READY);
    if ready.status != "True" && was(READY).is_some_and(|(s, _)| s == "True") {
        events.push(Event {
            type_: EventType::Warning,
            reason: "NotReady".into(),
            note: Some(ready.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    if ready.status == "True" && was(READY).is_none_or(|(s, _)| s != "True") {
        events.push(Event {
            type_: EventType::Normal,
            reason: "Ready".into(),
            note: Some(format!(
                "the session-monitor pod is ready; Qlik appenders send to {}",
                next.endpoint.as_deref().unwrap_or("its Service")
            )),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    events
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Exponential backoff per monitor: 5 s, 10 s, 20 s … at most 5 min.
pub fn error_policy(monitor: Arc<SessionMonitor>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().expect("failures lock");
    let count = failures.entry(key(&monitor)).or_insert(0);
    *count = count.saturating_add(1);
    let delay = backoff(*count);
    warn!(monitor = %key(&monitor), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(10);
    (BACKOFF_BASE * factor).min(BACKOFF_MAX)
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
