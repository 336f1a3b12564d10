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
