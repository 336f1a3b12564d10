//! The Kubernetes permissions the operator uses, in one table: the Helm chart's ClusterRole is
//! tested against it, so code and chart cannot drift apart.

/// `(API group, resource, verbs)`. Server-side apply creates and updates with `patch`.
pub const OPERATOR_RULES: &[(&str, &str, &[&str])] = &[
    // The resources it reconciles, and their status.
    (
        "sessionmonitor.io",
        "sessionmonitors",
        &["get", "list", "watch"],
    ),
    (
        "sessionmonitor.io",
        "sessionmonitors/status",
        &["get", "patch"],
    ),
    // Children: applied, and watched (label-selected) so drift is corrected.
    // `update` only because the service's Role grants it (see GRANTED_TO_SERVICE).
    (
        "",
        "configmaps",
        &["get", "list", "watch", "patch", "update"],
    ),
    ("", "services", &["get", "list", "watch", "patch"]),
    ("", "serviceaccounts", &["get", "list", "watch", "patch"]),
    ("apps", "deployments", &["get", "list", "watch", "patch"]),
    (
        "rbac.authorization.k8s.io",
        "roles",
        &["get", "list", "watch", "patch"],
    ),
    (
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["get", "list", "watch", "patch"],
    ),
    // Referenced Secrets are checked (existence and keys), never copied.
    ("", "secrets", &["get"]),
    (
        "monitoring.coreos.com",
        "servicemonitors",
        &["get", "patch", "delete"],
    ),
    ("events.k8s.io", "events", &["create", "patch"]),
    // Leader election: kube-lease-manager reads, creates and server-side applies its Lease.
    ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
];

/// What the service's Role grants, which Kubernetes only lets the operator grant if it holds
/// the same permissions itself (RBAC's escalation check).
pub const GRANTED_TO_SERVICE: (&str, &str, &[&str]) = ("", "configmaps", &["get", "update"]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_holds_what_it_grants_the_service() {
        let (group, resource, verbs) = GRANTED_TO_SERVICE;
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
