//! `mqtts://` with a private CA, a client certificate and a password, against a mosquitto that
//! requires all three.

mod common;

use std::path::Path;
use std::process::Command;

use common::datagram::butler;
use common::{Mosquitto, Service, wait_for};
use session_monitor_testkit::certs;

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate in `dir`:
/// `ca.pem`, `server.pem` and `server_key.pem`, `client.pem` and `client_key.pem`.
fn make_certificates(dir: &Path) {
    certs::make_ca(dir, "ca", "e2e-ca");
    certs::issue(
        dir,
        "ca",
        "server",
        "server",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
    certs::issue(
        dir,
        "ca",
        "client",
        "client",
        "extendedKeyUsage=clientAuth\n",
    );
    // mosquitto may run as another user than the test.
    for file in ["server_key.pem", "client_key.pem"] {
        std::fs::set_permissions(
            dir.join(file),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
    }
}

fn tls_broker() -> Mosquitto {
    Mosquitto::start_with(|dir| {
        make_certificates(dir);
        let passwords = dir.join("passwords");
        let out = Command::new(common::program("mosquitto_passwd"))
            .args(["-b", "-c"])
            .arg(&passwords)
            .args(["monitor", "s3cret pass"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::set_permissions(
            &passwords,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        format!(
            "cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server_key.pem\nrequire_certificate true\nallow_anonymous false\npassword_file {p}\n",
            d = dir.display(),
            p = passwords.display()
        )
    })
}

#[test]
fn publishes_over_mutual_tls_with_a_password_file() {
    let broker = tls_broker();
    let certs = broker.dir.path();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("mqtt-password");
    std::fs::write(&password_file, "s3cret pass\n").unwrap();
    let service = Service::start(
        dir.path(),
        &[
            "--mqtt-url",
            &format!("mqtts://127.0.0.1:{}", broker.port),
            "--mqtt-ca-file",
            &certs.join("ca.pem").display().to_string(),
            "--mqtt-client-cert-file",
            &certs.join("client.pem").display().to_string(),
            "--mqtt-client-key-file",
            &certs.join("client_key.pem").display().to_string(),
            "--mqtt-username",
            "monitor",
            "--mqtt-password-file",
            &password_file.display().to_string(),
        ],
    );
    service.send(butler("Start session", "qs1", "LAB", "joe"));
    wait_for("a TLS connection and a state publish", || {
        (service.metric("session_monitor_mqtt_connected")? == 1.0
            && service.metric("session_monitor_mqtt_publishes_total{kind=\"state\"}")? >= 3.0)
            .then_some(())
    });
    // Read it back through the broker with mosquitto_sub, over the same TLS listener.
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "qliksense/users/active/count",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .args(["--cafile", &certs.join("ca.pem").display().to_string()])
        .args([
            "--cert",
            &certs.join("client.pem").display().to_string(),
            "--key",
            &certs.join("client_key.pem").display().to_string(),
        ])
        .args(["-u", "monitor", "-P", "s3cret pass"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !service.log_text().contains("s3cret"),
        "the password is never logged"
    );
}

#[test]
fn a_wrong_password_from_the_environment_is_refused_and_retried() {
    let broker = tls_broker();
    let certs = broker.dir.path();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--mqtt-url".to_owned(),
        format!("mqtts://127.0.0.1:{}", broker.port),
        "--mqtt-ca-file".to_owned(),
        certs.join("ca.pem").display().to_string(),
        "--mqtt-client-cert-file".to_owned(),
        certs.join("client.pem").display().to_string(),
        "--mqtt-client-key-file".to_owned(),
        certs.join("client_key.pem").display().to_string(),
        "--mqtt-username".to_owned(),
        "monitor".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // SESSION_MONITOR_MQTT_PASSWORD is passed through the harness's environment hook.
    let service = Service::start_with_env(
        dir.path(),
        &args,
        &[("SESSION_MONITOR_MQTT_PASSWORD", "wrong")],
    );
    wait_for("refused connection attempts to be counted", || {
        (service.metric("session_monitor_mqtt_connection_errors_total")? >= 2.0).then_some(())
    });
    assert_eq!(service.metric("session_monitor_mqtt_connected"), Some(0.0));
    assert!(
        // An authentication refusal, not a TLS or network failure.
        service
            .log_text()
            .contains("Connection refused, return code: `NotAuthorized`"),
        "{}",
        service.log_text()
    );
    assert!(
        !service.log_text().contains("wrong"),
        "the password is never logged"
    );
    // UDP and HTTP keep working while MQTT is refused.
    service.send(butler("Start session", "qs1", "LAB", "joe"));
    wait_for("the user counted", || {
        (service.metric("session_monitor_active_users")? == 1.0).then_some(())
    });
}
