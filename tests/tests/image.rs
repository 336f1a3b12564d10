//! The image tooling's tests (image/test_image.py: image/build writes the image the Dockerfile
//! describes; image/oci.py writes OCI archives with matching digests, reproducibly), run by
//! `cargo test` so that the README's one test command covers them.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_image_tooling_passes_its_tests() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = Command::new("python3")
        .arg("image/test_image.py")
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 image/test_image.py: {e}"));
    let stdout = String::from_utf8_lossy(&run.stdout);
    print!("{stdout}");
    assert!(
        run.status.success(),
        "image/test_image.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
