//! Update status: what a reconcile found, turned into `status` (conditions and endpoint). Pure:
//! the time is passed in, and a condition keeps its `lastTransitionTime` while its status holds.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::SessionMonitorStatus;
use crate::usage::Usage;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// True while the ready service's `/metrics` cannot be read (absent while it can).
pub const USAGE_READ_FAILING: &str = "UsageReadFailing";
/// Reason of `Degraded` when the Deployment exceeded its progress deadline.
pub const ROLLOUT_FAILED: &str = "RolloutFailed";

/// What the reconcile achieved; every failure carries the message shown in `Degraded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every object applied.
    Applied,
    /// The spec cannot be deployed; nothing was applied.
    InvalidSpec(String),
    /// A referenced Secret or key does not exist; nothing was applied.
    MissingSecret(String),
    /// The API server refused an object.
    ApplyFailed(String),
    /// Another API call failed (unreachable, forbidden…); retried with backoff.
    ApiError(String),
}

impl Outcome {
    /// The `reason` of `Degraded`, and the `result` label of the reconcile metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Applied => "Reconciled",
            Outcome::InvalidSpec(_) => "InvalidSpec",
            Outcome::MissingSecret(_) => "MissingSecret",
            Outcome::ApplyFailed(_) => "ApplyFailed",
            Outcome::ApiError(_) => "ApiError",
        }
    }
}

/// The status after a reconcile. `deployment` and `service` are as the API server last returned
/// them (absent before the first apply); `previous` is the current status.
pub fn compute(
    outcome: &Outcome,
    generation: Option<i64>,
    deployment: Option<&Deployment>,
    endpoint: Option<String>,
    previous: Option<&SessionMonitorStatus>,
    now: Time,
) -> SessionMonitorStatus {
    let rollout = Rollout::of(deployment);
    let (ready, ready_reason, ready_message) = match &rollout {
        Rollout::Absent => (
            false,
            "NotDeployed",
            "the service is not deployed yet".to_owned(),
        ),
        Rollout::Rolling { available: true }
        | Rollout::Complete
        | Rollout::Failed {
            available: true, ..
        } => (
            true,
            "Available",
            "the session-monitor pod is ready".to_owned(),
        ),
        Rollout::Rolling { available: false }
        | Rollout::Failed {
            available: false, ..
        } => (
            false,
            "Unavailable",
            "waiting for the session-monitor pod to become ready".to_owned(),
        ),
    };
    let (progressing, progressing_reason, progressing_message) = match (outcome, &rollout) {
        (Outcome::Applied, Rollout::Complete) => (
            false,
            "Complete",
            "the current spec is rolled out".to_owned(),
        ),
        (Outcome::Applied, Rollout::Failed { .. }) => (
            false,
            ROLLOUT_FAILED,
            "the rollout stopped; see Degraded".to_owned(),
        ),
        (Outcome::Applied, _) => (
            true,
            "RollingOut",
            "rolling out the current spec".to_owned(),
        ),
        (failure, _) => (
            false,
            failure.reason(),
            "the current spec cannot be rolled out; see Degraded".to_owned(),
        ),
    };
    let (degraded, degraded_reason, degraded_message) = match (outcome, &rollout) {
        // Everything applied, but the pod does not come up (a crash loop, an image that cannot
        // be pulled…): the Deployment controller says so once its progress deadline passed.
        (Outcome::Applied, Rollout::Failed { message, .. }) => (
            true,
            ROLLOUT_FAILED,
            format!("the session-monitor Deployment does not progress: {message}"),
        ),
        (Outcome::Applied, _) => (
            false,
            outcome.reason(),
            "all objects are applied".to_owned(),
        ),
        (
            Outcome::InvalidSpec(m)
            | Outcome::MissingSecret(m)
            | Outcome::ApplyFailed(m)
            | Outcome::ApiError(m),
            _,
        ) => (true, outcome.reason(), m.clone()),
    };
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" }.to_owned();
        let since = previous_conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time: since,
        }
    };
    SessionMonitorStatus {
        observed_generation: generation,
        conditions: vec![
            condition(READY, ready, ready_reason, ready_message),
            condition(
                PROGRESSING,
                progressing,
                progressing_reason,
                progressing_message,
            ),
            condition(DEGRADED, degraded, degraded_reason, degraded_message),
        ],
        endpoint: endpoint.or_else(|| previous.and_then(|p| p.endpoint.clone())),
        // The numbers come from [`with_numbers`].
        ..SessionMonitorStatus::default()
    }
}

/// `status` with its numbers, the one place they are set: the shards the applied Role grants
/// (`granted`; the previous grant when nothing was applied, since a grant is never lowered),
/// and the service's own figures (unknown, not stale, when it cannot be read).
pub fn with_numbers(
    status: SessionMonitorStatus,
    granted: Option<u16>,
    usage: Option<&Usage>,
    previous: Option<&SessionMonitorStatus>,
) -> SessionMonitorStatus {
    let usage = usage.cloned().unwrap_or_default();
    SessionMonitorStatus {
        checkpoint_shards: granted.or_else(|| previous.and_then(|p| p.checkpoint_shards)),
        active_users: usage.active_users,
        active_sessions: usage.active_sessions,
        last_event_time: usage.last_event,
        checkpoint_bytes: usage.checkpoint_bytes,
        checkpoint_shards_in_use: usage.checkpoint_shards_in_use,
        checkpoint_shards_wanted: usage.checkpoint_shards_wanted,
        ..status
    }
}

/// `status` with the condition `UsageReadFailing` when the last read of the service failed
/// (`failure` says why); without it when the read succeeded or was not tried. Present only while
/// it is true, as an abnormal condition: the three others stay as they are.
pub fn with_usage_read(
    mut status: SessionMonitorStatus,
    failure: Option<&str>,
    previous: Option<&SessionMonitorStatus>,
    now: Time,
) -> SessionMonitorStatus {
    if let Some(failure) = failure {
        let since = condition(previous, USAGE_READ_FAILING)
            .filter(|c| c.status == "True")
            .map_or(now, |c| c.last_transition_time.clone());
        status.conditions.push(Condition {
            type_: USAGE_READ_FAILING.to_owned(),
            status: "True".to_owned(),
            reason: "ReadFailed".to_owned(),
            message: format!("cannot read the service's /metrics: {failure}"),
            observed_generation: status.observed_generation,
            last_transition_time: since,
        });
    }
    status
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rollout {
    Absent,
    Rolling {
        available: bool,
    },
    Complete,
    /// The Deployment controller gave up on the current template (`ProgressDeadlineExceeded`).
    Failed {
        available: bool,
        message: String,
    },
}

impl Rollout {
    fn of(deployment: Option<&Deployment>) -> Rollout {
        let Some(deployment) = deployment else {
            return Rollout::Absent;
        };
        let status = deployment.status.clone().unwrap_or_default();
        let available = status.available_replicas.unwrap_or(0) >= 1;
        let observed =
            status.observed_generation.unwrap_or(0) >= deployment.metadata.generation.unwrap_or(0);
        // With `Recreate` and one replica, done means: the controller saw the current template,
        // its one pod is updated and available, and no old pod remains.
        let complete = observed
            && available
            && status.updated_replicas.unwrap_or(0) >= 1
            && status.replicas.unwrap_or(0) == status.updated_replicas.unwrap_or(0);
        let deadline_exceeded = status.conditions.iter().flatten().find(|c| {
            c.type_ == "Progressing"
                && c.status == "False"
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        });
        if complete {
            Rollout::Complete
        } else if let Some(condition) = deadline_exceeded {
            Rollout::Failed {
                available,
                message: condition.message.clone().unwrap_or_default(),
            }
        } else {
            Rollout::Rolling { available }
        }
    }
}

/// Where the Qlik proxies send datagrams: the load balancer's address once it has one, each
/// node's NodePort, or the cluster DNS name for in-cluster senders.
pub fn endpoint(service: &Service, udp_port: u16) -> Option<String> {
    let name = service.metadata.name.as_deref()?;
    let namespace = service.metadata.namespace.as_deref()?;
    let spec = service.spec.as_ref()?;
    let node_port = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.protocol.as_deref() == Some("UDP"))
        .and_then(|p| p.node_port);
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.ip.clone().or_else(|| i.hostname.clone()));
    Some(match (spec.type_.as_deref(), ingress, node_port) {
        (Some("LoadBalancer"), Some(address), _) => format!("{address}:{udp_port}"),
        (Some("LoadBalancer" | "NodePort"), None, Some(node_port)) => {
            format!("<node>:{node_port}")
        }
        _ => format!("{name}.{namespace}.svc:{udp_port}"),
    })
}

/// The condition of `type_` in `status`, if any.
pub fn condition<'a>(
    status: Option<&'a SessionMonitorStatus>,
    type_: &str,
) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServicePort, ServiceSpec, ServiceStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    #[test]
    fn the_grant_outlives_an_unapplied_reconcile_and_figures_are_never_stale() {
        let previous = with_numbers(
            SessionMonitorStatus::default(),
            Some(19),
            Some(&Usage {
                active_users: Some(7),
                checkpoint_shards_wanted: Some(19),
                ..Usage::default()
            }),
            None,
        );
        assert_eq!(previous.checkpoint_shards, Some(19));
        assert_eq!(previous.active_users, Some(7));
        // Nothing applied and the service unread: the grant stays, the figures are unknown.
        let next = with_numbers(SessionMonitorStatus::default(), None, None, Some(&previous));
        assert_eq!(next.checkpoint_shards, Some(19));
        assert_eq!(
            (next.active_users, next.checkpoint_shards_wanted),
            (None, None)
        );
        // An applied grant is what the status says.
        let raised = with_numbers(
            SessionMonitorStatus::default(),
            Some(24),
            None,
            Some(&previous),
        );
        assert_eq!(raised.checkpoint_shards, Some(24));
    }

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
    }

    fn deployment(
        generation: i64,
        observed: i64,
        updated: i32,
        replicas: i32,
        available: i32,
    ) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..ObjectMeta::default()
            },
            status: Some(DeploymentStatus {
                observed_generation: Some(observed),
                updated_replicas: Some(updated),
                replicas: Some(replicas),
                available_replicas: Some(available),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        }
    }

    fn summary(status: &SessionMonitorStatus) -> Vec<(String, String, String)> {
        status
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect()
    }

    fn triple(t: &str, s: &str, r: &str) -> (String, String, String) {
        (t.into(), s.into(), r.into())
    }

    #[test]
    fn conditions_follow_the_rollout() {
        let applied = Outcome::Applied;
        let cases = [
            (None, ("False", "NotDeployed"), ("True", "RollingOut")),
            (
                Some(deployment(2, 1, 0, 0, 0)),
                ("False", "Unavailable"),
                ("True", "RollingOut"),
            ),
            // The old pod still serves while the new template is not observed: ready, rolling.
            (
                Some(deployment(2, 1, 0, 1, 1)),
                ("True", "Available"),
                ("True", "RollingOut"),
            ),
            (
                Some(deployment(2, 2, 1, 1, 1)),
                ("True", "Available"),
                ("False", "Complete"),
            ),
        ];
        for (d, ready, progressing) in cases {
            let s = compute(&applied, Some(2), d.as_ref(), None, None, at(0));
            assert_eq!(
                summary(&s),
                [
                    triple(READY, ready.0, ready.1),
                    triple(PROGRESSING, progressing.0, progressing.1),
                    triple(DEGRADED, "False", "Reconciled"),
                ],
                "{d:?}"
            );
            assert_eq!(s.observed_generation, Some(2));
            assert!(
                s.conditions
                    .iter()
                    .all(|c| c.observed_generation == Some(2))
            );
        }
    }

    #[test]
    fn a_rollout_past_its_deadline_degrades() {
        let mut stuck = deployment(2, 2, 1, 1, 0);
        stuck.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            message: Some("ReplicaSet \"qlik-prod-5d8\" has timed out progressing.".into()),
            ..DeploymentCondition::default()
        }]);
        let s = compute(&Outcome::Applied, Some(2), Some(&stuck), None, None, at(0));
        assert_eq!(
            summary(&s),
            [
                triple(READY, "False", "Unavailable"),
                triple(PROGRESSING, "False", ROLLOUT_FAILED),
                triple(DEGRADED, "True", ROLLOUT_FAILED),
            ]
        );
        assert!(
            condition(Some(&s), DEGRADED)
                .unwrap()
                .message
                .contains("has timed out progressing")
        );
    }

    #[test]
    fn failures_degrade_but_keep_readiness_of_the_running_pod() {
        let running = deployment(1, 1, 1, 1, 1);
        for outcome in [
            Outcome::InvalidSpec("spec.mqtt.qos: 5 is not 0, 1 or 2".into()),
            Outcome::MissingSecret("Secret \"x\" does not exist".into()),
            Outcome::ApplyFailed("applying Deployment x: 422".into()),
        ] {
            let s = compute(&outcome, Some(2), Some(&running), None, None, at(0));
            assert_eq!(
                summary(&s),
                [
                    triple(READY, "True", "Available"),
                    triple(PROGRESSING, "False", outcome.reason()),
                    triple(DEGRADED, "True", outcome.reason()),
                ]
            );
            let degraded = condition(Some(&s), DEGRADED).unwrap();
            assert!(matches!(&outcome,
                Outcome::InvalidSpec(m) | Outcome::MissingSecret(m) | Outcome::ApplyFailed(m)
                    if degraded.message == *m));
        }
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let first = compute(&Outcome::Applied, Some(1), None, None, None, at(100));
        let again = compute(
            &Outcome::Applied,
            Some(1),
            None,
            None,
            Some(&first),
            at(200),
        );
        assert_eq!(first, again, "nothing changed, so nothing to write");
        let ready = deployment(1, 1, 1, 1, 1);
        let later = compute(
            &Outcome::Applied,
            Some(1),
            Some(&ready),
            None,
            Some(&again),
            at(300),
        );
        assert_eq!(
            condition(Some(&later), READY).unwrap().last_transition_time,
            at(300)
        );
        assert_eq!(
            condition(Some(&later), DEGRADED)
                .unwrap()
                .last_transition_time,
            at(100)
        );
    }

    fn service(
        type_: &str,
        node_port: Option<i32>,
        ingress: Option<LoadBalancerIngress>,
    ) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("smon".into()),
                namespace: Some("qlik".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                ports: Some(vec![
                    ServicePort {
                        port: 9842,
                        protocol: Some("TCP".into()),
                        node_port: Some(30001),
                        ..ServicePort::default()
                    },
                    ServicePort {
                        port: 9997,
                        protocol: Some("UDP".into()),
                        node_port,
                        ..ServicePort::default()
                    },
                ]),
                ..ServiceSpec::default()
            }),
            status: ingress.map(|i| ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![i]),
                }),
                ..ServiceStatus::default()
            }),
        }
    }

    #[test]
    fn the_endpoint_is_where_the_proxies_can_send() {
        assert_eq!(
            endpoint(&service("ClusterIP", None, None), 9997).as_deref(),
            Some("smon.qlik.svc:9997")
        );
        assert_eq!(
            endpoint(&service("NodePort", Some(31997), None), 9997).as_deref(),
            Some("<node>:31997")
        );
        let ip = LoadBalancerIngress {
            ip: Some("10.1.2.3".into()),
            ..LoadBalancerIngress::default()
        };
        assert_eq!(
            endpoint(&service("LoadBalancer", Some(31997), Some(ip)), 9997).as_deref(),
            Some("10.1.2.3:9997")
        );
        // A load balancer still being provisioned: its node ports already work.
        assert_eq!(
            endpoint(&service("LoadBalancer", Some(31997), None), 9997).as_deref(),
            Some("<node>:31997")
        );
    }
}
