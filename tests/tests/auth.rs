//! The optional API token: without it the API and the page answer 401 (or send a browser to
//! sign in), with it 200; `/metrics` and the probes stay open; the token never reaches the log.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::datagram::own;
use common::{Service, command, wait_for};

const TOKEN: &str = "c0ffee-7f3a9b2e41d8-5e6f";

/// `(status, head, body)` of a request with extra header lines.
fn request(
    service: &Service,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", service.http_port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

#[test]
fn the_api_and_the_page_need_the_token_and_metrics_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start_with_env(
        dir.path(),
        &["--mqtt-url", "mqtt://127.0.0.1:9"],
        &[("SESSION_MONITOR_API_TOKEN", TOKEN)],
    );
    service.send(own("Start session", "qs1", "LAB", "joe", "s1"));
    wait_for("joe counted", || {
        (service.metric("session_monitor_active_users") == Some(1.0)).then_some(())
    });

    // Without the token.
    for path in [
        "/api/v1/summary",
        "/api/v1/users",
        "/api/v1/stream",
        "/assets/app.js",
    ] {
        let (status, head, body) = request(&service, "GET", path, "", "");
        assert_eq!(status, 401, "{path}: {head}");
        assert!(
            head.to_lowercase().contains("www-authenticate: bearer"),
            "{head}"
        );
        assert!(body.contains("Authorization: Bearer"), "{body}");
        assert!(!body.contains("joe"));
    }
    let (status, head, _) = request(&service, "GET", "/", "", "");
    assert_eq!(status, 303, "a browser is sent to sign in: {head}");
    assert!(head.to_lowercase().contains("location: login"), "{head}");
    let wrong = format!("Authorization: Bearer {}x\r\n", TOKEN);
    assert_eq!(
        request(&service, "GET", "/api/v1/summary", &wrong, "").0,
        401
    );
    // Open whatever the token: Prometheus and the kubelet carry none.
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(request(&service, "GET", path, "", "").0, 200, "{path}");
    }

    // With it.
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    let (status, _, body) = request(&service, "GET", "/api/v1/summary", &bearer, "");
    assert_eq!(status, 200);
    assert!(body.contains("LAB\\\\joe"), "{body}");

    // A browser signs in once; the cookie then carries the token (also for the event stream).
    let form = "Content-Type: application/x-www-form-urlencoded\r\n";
    let (status, _, body) = request(
        &service,
        "POST",
        "/login",
        form,
        "token=guess-guess-guess-guess",
    );
    assert_eq!(status, 401);
    assert!(body.contains("not the token"), "{body}");
    let (status, head, _) = request(&service, "POST", "/login", form, &format!("token={TOKEN}"));
    assert_eq!(status, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .expect("a cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let with_cookie = format!("Cookie: theme=dark; {pair}\r\n");
    assert_eq!(request(&service, "GET", "/", &with_cookie, "").0, 200);
    assert_eq!(
        request(&service, "GET", "/api/v1/users", &with_cookie, "").0,
        200
    );

    let log = service.log_text();
    assert!(!log.contains(TOKEN), "the token is in the log");
    assert!(log.contains("a sign-in with a wrong API token"));
}

#[test]
fn a_short_token_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "short\n").unwrap();
    let out = command()
        .args(["--api-token-file", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("api_token_file") && stderr.contains("16"),
        "{stderr}"
    );
}
