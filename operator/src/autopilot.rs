//! The checkpoint shard autopilot: the operator grants a monitor's checkpoint the shard
//! ConfigMaps its service says it calls for (`checkpoint_shards_wanted`, which allows for a
//! quarter of growth, so the grant comes while writes still succeed), up to
//! `spec.checkpoint.maxShards`. Pure; the reconciler applies what [`decide`] says: the Role and
//! the new ConfigMaps first, then the setting in the mounted configuration file, which the
//! service reads while running, so the pod is not rolled.

use k8s_openapi::api::rbac::v1::Role;

/// What to do about a monitor's grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Enough is granted, or the service's need is not known.
    Keep,
    /// Grant `to` shards instead of `from`; `to` is below `wanted` when the maximum stops it.
    Raise { from: u16, to: u16, wanted: u64 },
    /// More is wanted than `spec.checkpoint.maxShards`, which is granted in full already.
    AtMaximum { granted: u16, wanted: u64 },
}

/// The `decision` label of `session_monitor_operator_checkpoint_autopilot_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Raised,
    RaisedToMaximum,
    AtMaximum,
}

impl Label {
    pub const ALL: [Label; 3] = [Label::Raised, Label::RaisedToMaximum, Label::AtMaximum];

    pub fn as_str(self) -> &'static str {
        match self {
            Label::Raised => "raised",
            Label::RaisedToMaximum => "raised_to_maximum",
            Label::AtMaximum => "at_maximum",
        }
    }
}

impl Decision {
    pub fn label(self) -> Option<Label> {
        match self {
            Decision::Keep => None,
            Decision::Raise { to, wanted, .. } if u64::from(to) < wanted => {
                Some(Label::RaisedToMaximum)
            }
            Decision::Raise { .. } => Some(Label::Raised),
            Decision::AtMaximum { .. } => Some(Label::AtMaximum),
        }
    }
}

/// The shards a monitor's Role grants: the highest `<checkpoint>-N` among its resource names.
/// The Role, not the status, is the record of a grant: it is applied before anything uses the
/// shards, and read fresh, where the status the controller hands a reconcile may be older than
/// the grant (a reconcile woken by the Role's own change can run before the status write is
/// seen, and would then take the grant back).
pub fn granted_by(role: &Role, checkpoint: &str) -> Option<u16> {
    role.rules
        .iter()
        .flatten()
        .flat_map(|rule| rule.resource_names.iter().flatten())
        .filter_map(|name| {
            name.strip_prefix(checkpoint)?
                .strip_prefix('-')?
                .parse()
                .ok()
        })
        .max()
}

/// `granted`: the shards the Role names now; `max`: `spec.checkpoint.maxShards`; `wanted`: what
/// the service last said (`None` when it could not be read).
pub fn decide(granted: u16, max: u16, wanted: Option<u64>) -> Decision {
    let Some(wanted) = wanted.filter(|&w| w > u64::from(granted)) else {
        return Decision::Keep;
    };
    if granted >= max {
        return Decision::AtMaximum { granted, wanted };
    }
    let to = u16::try_from(wanted).unwrap_or(u16::MAX).min(max);
    Decision::Raise {
        from: granted,
        to,
        wanted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grant_is_read_from_the_role() {
        let role: Role = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "qlik-prod"},
            "rules": [{
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [
                    "qlik-prod-checkpoint", "qlik-prod-checkpoint-1", "qlik-prod-checkpoint-19",
                    "qlik-prod-checkpoint-2", "qlik-prod-checkpoint-corrupt-1", "other-checkpoint-40"
                ],
                "verbs": ["get", "update"],
            }],
        }))
        .unwrap();
        assert_eq!(granted_by(&role, "qlik-prod-checkpoint"), Some(19));
        assert_eq!(granted_by(&Role::default(), "qlik-prod-checkpoint"), None);
    }

    #[test]
    fn enough_or_unknown_keeps_the_grant() {
        assert_eq!(decide(16, 100, None), Decision::Keep);
        assert_eq!(decide(16, 100, Some(0)), Decision::Keep, "a file store");
        assert_eq!(decide(16, 100, Some(16)), Decision::Keep);
    }

    #[test]
    fn more_wanted_is_granted_up_to_the_maximum() {
        let raise = decide(16, 100, Some(18));
        assert_eq!(
            raise,
            Decision::Raise {
                from: 16,
                to: 18,
                wanted: 18
            }
        );
        assert_eq!(raise.label(), Some(Label::Raised));
        let capped = decide(16, 17, Some(18));
        assert_eq!(
            capped,
            Decision::Raise {
                from: 16,
                to: 17,
                wanted: 18
            }
        );
        assert_eq!(capped.label(), Some(Label::RaisedToMaximum));
        let full = decide(17, 17, Some(18));
        assert_eq!(
            full,
            Decision::AtMaximum {
                granted: 17,
                wanted: 18
            }
        );
        assert_eq!(full.label(), Some(Label::AtMaximum));
        // A nonsense figure cannot overflow the grant.
        assert_eq!(
            decide(16, 100, Some(u64::MAX)),
            Decision::Raise {
                from: 16,
                to: 100,
                wanted: u64::MAX
            }
        );
    }
}
