//! The page at `/`: the live count, the per-proxy counts, the service's health, the history chart
//! and the user list, in one HTML file, one script and one style sheet embedded in the binary (no
//! CDN, no build step). The page reads the JSON API under `/api/v1` and its event stream.
//!
//! Every answer carries an `ETag` and `Cache-Control: no-cache`: a browser revalidates (a `304`
//! without a body) and so never runs a script from an older binary beside a newer page.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../page/index.html"),
};

/// Served under `/assets/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../page/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../page/app.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../page/icon.svg"),
    },
];

/// The page loads only its own script, style sheet and icon, and talks only to its own origin;
/// nothing inline runs, so a user name that slipped into markup still could not.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/` and `/assets/{name}`; merged into the service's router.
pub fn router() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
}

async fn index(request: HeaderMap) -> Response {
    let mut response = serve(&INDEX, &request);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn asset(Path(name): Path<String>, request: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(asset) => serve(asset, &request),
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}

fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let etag = etag(asset);
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag
        });
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::ETAG,
            HeaderValue::from_str(&etag).expect("an ETag is ASCII"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    if fresh {
        (StatusCode::NOT_MODIFIED, headers).into_response()
    } else {
        (headers, asset.body).into_response()
    }
}

/// A strong validator from the content itself: a new binary with the same file keeps its tag.
fn etag(asset: &Asset) -> String {
    format!(
        "\"{:08x}-{:x}\"",
        crc32fast::hash(asset.body),
        asset.body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, to_bytes};
    use axum::http::Request;
    use tower_test::mock::Spawn;

    async fn get(path: &str, if_none_match: Option<&str>) -> Response {
        let mut request = Request::get(path);
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        let request = request.body(Body::empty()).unwrap();
        let mut service = Spawn::new(router().into_service::<Body>());
        assert!(service.poll_ready::<Request<Body>>().is_ready());
        service.call(request).await.unwrap()
    }

    fn header(response: &Response, name: header::HeaderName) -> &str {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn the_page_and_its_assets_are_served_with_their_types_and_validators() {
        for (path, content_type, file) in [
            ("/", "text/html; charset=utf-8", INDEX.body),
            (
                "/assets/app.js",
                "text/javascript; charset=utf-8",
                ASSETS[0].body,
            ),
            ("/assets/app.css", "text/css; charset=utf-8", ASSETS[1].body),
            ("/assets/icon.svg", "image/svg+xml", ASSETS[2].body),
        ] {
            let response = get(path, None).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(header(&response, header::CONTENT_TYPE), content_type);
            assert_eq!(header(&response, header::CACHE_CONTROL), "no-cache");
            assert_eq!(header(&response, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
            let tag = header(&response, header::ETAG).to_owned();
            assert!(tag.starts_with('"') && tag.ends_with('"'), "{tag}");
            let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
            assert_eq!(&body[..], file, "{path}");

            let again = get(path, Some(&format!("\"other\", W/{tag}"))).await;
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
            assert_eq!(header(&again, header::ETAG), tag);
            let body = to_bytes(again.into_body(), usize::MAX).await.unwrap();
            assert!(body.is_empty());
            let changed = get(path, Some("\"other\"")).await;
            assert_eq!(changed.status(), StatusCode::OK, "{path}");
        }
    }

    #[tokio::test]
    async fn the_page_runs_only_its_own_script_and_unknown_assets_are_404() {
        let page = get("/", None).await;
        let policy = header(&page, header::CONTENT_SECURITY_POLICY);
        assert!(policy.contains("script-src 'self'"), "{policy}");
        assert!(!policy.contains("unsafe"), "{policy}");
        let html = String::from_utf8(INDEX.body.to_vec()).unwrap();
        for asset in ASSETS {
            assert!(
                html.contains(&format!("\"assets/{}\"", asset.name)),
                "index.html links {}",
                asset.name
            );
        }
        // Relative links: the page also works behind a reverse proxy under a path prefix.
        assert!(!html.contains("\"/assets/") && !html.contains("\"/api/"));
        for path in ["/assets/nothing.js", "/assets/..%2Fsrc%2Flib.rs"] {
            assert_eq!(
                get(path, None).await.status(),
                StatusCode::NOT_FOUND,
                "{path}"
            );
        }
    }
}
