//! The Helm chart's tests (charts/tests/test_chart.py: the real Helm engine through
//! helm-python-sdk, kubernetes-validate, promtool), run by `cargo test` so that the README's one
//! test command covers the chart too. Missing Python modules fail the test: never a silent skip.

use std::path::PathBuf;
use std::process::Command;

const INSTALL: &str = "pip install helm-python-sdk kubernetes-validate";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> Command {
    let mut command = Command::new("python3");
    command.current_dir(repo_root());
    command
}

#[test]
fn the_helm_chart_passes_its_tests() {
    let modules = python()
        .args(["-c", "import helm_python, kubernetes_validate"])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}); the chart tests need Python 3 and `{INSTALL}`")
        });
    assert!(
        modules.status.success(),
        "the chart tests need two Python packages: {INSTALL}\n{}",
        String::from_utf8_lossy(&modules.stderr)
    );

    let run = python()
        .arg("charts/tests/test_chart.py")
        .output()
        .expect("run python3 charts/tests/test_chart.py");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    print!("{stdout}");
    assert!(
        run.status.success(),
        "charts/tests/test_chart.py failed ({}):\n{stdout}{stderr}",
        run.status
    );
}
