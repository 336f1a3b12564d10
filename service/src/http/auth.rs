//! Optional bearer-token authentication for the API and the page: user names are personal
//! data, and the HTTP port is reachable by whoever can scrape `/metrics`. With `api_token_file`
//! (or `SESSION_MONITOR_API_TOKEN`) set, `/api/*`, `/` and its assets need the token, either as
//! `Authorization: Bearer <token>` (scripts, Node-RED, Grafana) or as the cookie that `/login`
//! sets for a browser (whose event stream cannot send headers). `/metrics` and the probes stay
//! open: Prometheus and the kubelet carry no token.

use axum::Form;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use crate::config::ApiToken;

pub const COOKIE: &str = "session_monitor_token";

/// Lets a request through if it carries the token; otherwise a browser asking for the page is
/// sent to the login form, and anything else gets a 401 saying what is missing.
pub async fn require_token(
    State(token): State<ApiToken>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if path == "/login" || presented(request.headers()).is_some_and(|t| token.matches(t)) {
        return next.run(request).await;
    }
    if path == "/" {
        return Redirect::to("login").into_response();
    }
    let body = axum::Json(serde_json::json!({
        "error": "this service requires a token: send Authorization: Bearer <token> (see api_token_file)"
    }));
    let mut response = (StatusCode::UNAUTHORIZED, body).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"session-monitor\""),
    );
    response
}

/// The token a request presents: the bearer header, else the login cookie.
fn presented(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer.or_else(|| {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
    })
}

const LOGIN_FORM: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>session-monitor: sign in</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 24rem; margin: 4rem auto; padding: 0 1rem">
<h1 style="font-size: 1.3rem">Qlik Sense active users</h1>
<form method="post" action="login">
<p><label for="token">This service asks for its API token.</label></p>
<p><input id="token" name="token" type="password" autocomplete="current-password" required style="width: 100%; padding: .5rem"></p>
<p><button type="submit" style="padding: .5rem 1rem">Sign in</button></p>
</form>
<p style="color: #b00">{error}</p>
</body></html>
"#;

pub async fn login_form() -> Html<String> {
    Html(LOGIN_FORM.replace("{error}", ""))
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

/// Checks the token and, if it is right, keeps it in an HTTP-only, same-site cookie.
pub async fn login(State(token): State<ApiToken>, Form(login): Form<Login>) -> Response {
    if !token.matches(&login.token) {
        tracing::warn!("a sign-in with a wrong API token");
        let page = LOGIN_FORM.replace("{error}", "That is not the token.");
        return (StatusCode::UNAUTHORIZED, Html(page)).into_response();
    }
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
        login.token
    );
    let mut response = Redirect::to("./").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}
