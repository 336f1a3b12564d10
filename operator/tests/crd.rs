//! The committed CRD is what the Rust types generate, and the example in the README is valid.

use std::path::Path;

use session_monitor_operator::crdgen;

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[test]
fn the_committed_crd_is_current() {
    let committed = repo_file(crdgen::CRD_FILE);
    assert!(
        committed == crdgen::yaml(),
        "{} is stale: run `cargo run -p session-monitor-operator -- crdgen > {}`",
        crdgen::CRD_FILE,
        crdgen::CRD_FILE
    );
}

#[test]
fn the_readme_shows_the_example_monitor_verbatim() {
    let example = repo_file("examples/sessionmonitor.yaml");
    let readme = repo_file("README.md");
    assert!(
        readme.contains(&example),
        "README.md must contain examples/sessionmonitor.yaml verbatim"
    );
}

#[test]
fn the_chart_carries_the_same_crd() {
    assert!(
        repo_file(crdgen::CHART_CRD_FILE) == repo_file(crdgen::CRD_FILE),
        "{} differs from {}: copy it",
        crdgen::CHART_CRD_FILE,
        crdgen::CRD_FILE
    );
}

#[test]
fn the_chart_grants_the_rules_the_operator_uses() {
    assert!(
        repo_file(crdgen::CHART_RULES_FILE) == crdgen::rbac_rules_yaml(),
        "{} is stale: run `cargo run -p session-monitor-operator -- rbac-rules > {}`",
        crdgen::CHART_RULES_FILE,
        crdgen::CHART_RULES_FILE
    );
}

/// `kubectl get sessionmonitors` as it renders a ready monitor with users: the CRD's printer
/// columns, their JSONPaths evaluated on a monitor whose status the operator wrote.
#[test]
fn kubectl_get_shows_ready_users_sessions_endpoint_and_age() {
    let crd = crdgen::json();
    let columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .clone();
    let names: Vec<&str> = columns
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Ready", "Users", "Sessions", "Endpoint", "Age"]);
    let monitor = serde_json::json!({
        "metadata": {"name": "qlik-prod", "creationTimestamp": "2025-11-25T09:00:00Z"},
        "status": {
            "conditions": [
                {"type": "Progressing", "status": "False"},
                {"type": "Ready", "status": "True"},
            ],
            "endpoint": "qlik-prod.qlik.svc:9997",
            "activeUsers": 42,
            "activeSessions": 57,
        }
    });
    // The JSONPath subset the columns use: `.a.b` and `.a[?(@.type=="X")].b`.
    let cell = |path: &str| -> String {
        let mut value = &monitor;
        // Split on the dots outside brackets.
        let (mut steps, mut depth, mut start) = (Vec::new(), 0, 1);
        for (i, c) in path.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                '.' if depth == 0 && i > 0 => {
                    steps.push(&path[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        steps.push(&path[start..]);
        for step in steps {
            value = match step.split_once("[?(@.type==\"") {
                Some((field, rest)) => {
                    let wanted = rest.trim_end_matches("\")]");
                    value[field]
                        .as_array()
                        .and_then(|items| items.iter().find(|i| i["type"] == wanted))
                        .unwrap_or(&serde_json::Value::Null)
                }
                None => &value[step],
            };
        }
        match value {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    };
    let row: Vec<String> = columns
        .iter()
        .map(|c| cell(c["jsonPath"].as_str().unwrap()))
        .collect();
    assert_eq!(
        row,
        [
            "True",
            "42",
            "57",
            "qlik-prod.qlik.svc:9997",
            "2025-11-25T09:00:00Z"
        ]
    );
    let types: Vec<&str> = columns
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["string", "integer", "integer", "string", "date"]);
}

/// A spec field added through the settings table (`spec_settings.rs`) is documented too.
#[test]
fn the_readme_reference_documents_every_field_the_settings_table_renders() {
    let readme = repo_file("README.md");
    let reference = readme
        .split("### SessionMonitor reference")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .expect("README has the SessionMonitor reference");
    let rows: Vec<&str> = reference.lines().filter(|l| l.starts_with("| `")).collect();
    for key in session_monitor_operator::spec_settings::RENDERED {
        let path = session_monitor_operator::spec_settings::spec_path(key).unwrap();
        let Some(field) = path.strip_prefix("spec.") else {
            continue; // metadata.name: not a spec field
        };
        // A row names the field, a field under it (`mqtt.tls.caSecret.name`), or abbreviates it
        // after its sibling (`mqtt.topics.userCount`, `.userList`).
        let (parent, last) = field.rsplit_once('.').unwrap_or(("", field));
        let documented = rows.iter().any(|row| {
            let first = row.split(" | ").next().unwrap_or_default();
            first.contains(&format!("`{field}`"))
                || first.contains(&format!("`{field}."))
                || (first.starts_with(&format!("| `{parent}."))
                    && first.contains(&format!("`.{last}`")))
        });
        assert!(
            documented,
            "README's SessionMonitor reference lacks `{field}` ({key})"
        );
    }
}
