//! Certificates made with the `openssl` tool, for the tests' TLS servers and clients (the fake
//! Qlik site's, the TLS broker's): a CA, and certificates it issues with the extensions given.
//! Two days of validity: they live as long as a test's temporary directory.

use std::path::Path;
use std::process::Command;

/// A self-signed CA: `{name}.pem` and `{name}_key.pem` in `dir`.
pub fn make_ca(dir: &Path, name: &str, common_name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={common_name}"),
            "-keyout",
            &format!("{name}_key.pem"),
            "-out",
            &format!("{name}.pem"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate for `common_name` with `extensions`, issued by the CA `ca` (see [`make_ca`]):
/// `{name}.pem` and `{name}_key.pem` in `dir`.
pub fn issue(dir: &Path, ca: &str, name: &str, common_name: &str, extensions: &str) {
    let (key, csr, pem, ext) = (
        format!("{name}_key.pem"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&ext), extensions).expect("write an openssl extensions file");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={common_name}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-days",
            "2",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}_key.pem"),
            "-CAcreateserial",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    );
}

/// Runs `openssl` in `dir`, failing the test with its error output if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
