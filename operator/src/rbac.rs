//! The Kubernetes permissions the operator uses, in one table: the Helm chart's ClusterRole is
//! tested against it, so code and chart cannot drift apart.

/// `(API group, resource, verbs)`. Server-side apply is a `patch`, and also needs `create`
/// for an object that does not exist yet (the API server checks both).
pub const OPERATOR_RULES: &[(&str, &str, &[&str])] = &[
    // The resources it reconciles (listed and watched), and their status.
    ("sessionmonitor.io", "sessionmonitors", &["list", "watch"]),
    ("sessionmonitor.io", "sessionmonitors/status", &["patch"]),
    // Children: applied, and watched (label-selected) so drift is corrected.
    // `get` and `update` on ConfigMaps only because the service's Role grants them (see
    // GRANTED_TO_SERVICE); the Deployment is read when a spec cannot be applied.
    (
        "",
        "configmaps",
        &["get", "list", "watch", "create", "patch", "update"],
    ),
    ("", "services", &["list", "watch", "create", "patch"]),
    ("", "serviceaccounts", &["list", "watch", "create", "patch"]),
    (
        "apps",
        "deployments",
        &["get", "list", "watch", "create", "patch"],
    ),
    // `get`: the monitor's Role is read at each reconcile, as the record of the checkpoint
    // shards granted (see `autopilot::granted_by`).
    (
        "rbac.authorization.k8s.io",
        "roles",
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["list", "watch", "create", "patch"],
    ),
    // Referenced Secrets are checked (existence and keys), never copied. `create` only for the
    // generated API token's Secret (`spec.apiAuth.generateToken`), which is never updated; no
    // list or watch, which would let the operator read every Secret it can see.
    ("", "secrets", &["get", "create"]),
    (
        "monitoring.coreos.com",
        "servicemonitors",
        &["get", "create", "patch", "delete"],
    ),
    ("events.k8s.io", "events", &["create", "patch"]),
    // Leader election: kube-lease-manager reads, creates and server-side applies its Lease.
    ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
];

/// What the service's Role grants, which Kubernetes only lets the operator grant if it holds
/// the same permissions itself (RBAC's escalation check): its checkpoint ConfigMaps, and the
/// Lease of its checkpoint writer.
pub const GRANTED_TO_SERVICE: &[(&str, &str, &[&str])] = &[
    ("", "configmaps", &["get", "update"]),
    ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_holds_what_it_grants_the_service() {
        for &(group, resource, verbs) in GRANTED_TO_SERVICE {
            let held = OPERATOR_RULES
                .iter()
                .find(|(g, r, _)| *g == group && *r == resource)
                .map(|(_, _, v)| *v)
                .unwrap_or(&[]);
            for verb in verbs {
                assert!(held.contains(verb), "operator lacks {verb} on {resource}");
            }
        }
    }
}
