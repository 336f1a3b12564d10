//! A mocked Kubernetes API server for ConfigMaps (tests only), on kube-rs's `tower-test` mock.
//!
//! It answers as a real API server does — 404 for a missing object, 409 for a create of an
//! existing one or a replace with a stale resourceVersion, 422 for a ConfigMap whose data
//! exceeds 1 MiB, resourceVersions that change on every write — and records every request, so
//! tests assert the exact calls a store makes, in order. Faults are injected per request.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

/// The API server's limit on a ConfigMap's data plus binaryData (binaryData counted decoded).
pub const MAX_CONFIGMAP_BYTES: usize = 1024 * 1024;

#[derive(Default)]
struct World {
    objects: BTreeMap<String, Value>,
    resource_version: u64,
    log: Vec<String>,
    /// The next matching requests get an error instead of their answer.
    faults: VecDeque<Fault>,
}

struct Fault {
    method: Method,
    path_suffix: String,
    status: u16,
    /// Whether the request takes effect before the error is answered, as when the API server
    /// dies after writing to etcd or the connection drops on the way back.
    applied: bool,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    world: Arc<Mutex<World>>,
}

impl FakeApi {
    /// A client talking to this fake, with `namespace` as its default.
    pub fn client(&self, namespace: &str) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let world = self.world.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let response = answer(&world, request).await;
                respond.send_response(response);
            }
        });
        kube::Client::new(service, namespace)
    }

    /// Every request so far as `METHOD /path`, and clears the record.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.world.lock().unwrap().log)
    }

    /// The next `method` request whose path ends with `path_suffix` fails with `status`.
    pub fn fail_next(&self, method: Method, path_suffix: &str, status: u16) {
        self.push_fault(method, path_suffix, status, false);
    }

    /// The next `method` request whose path ends with `path_suffix` takes effect, but its
    /// answer is `status`: the client cannot tell whether it was applied.
    pub fn lose_next_answer(&self, method: Method, path_suffix: &str, status: u16) {
        self.push_fault(method, path_suffix, status, true);
    }

    fn push_fault(&self, method: Method, path_suffix: &str, status: u16, applied: bool) {
        self.world.lock().unwrap().faults.push_back(Fault {
            method,
            path_suffix: path_suffix.to_owned(),
            status,
            applied,
        });
    }

    pub fn object(&self, name: &str) -> Option<Value> {
        self.world.lock().unwrap().objects.get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.world.lock().unwrap().objects.keys().cloned().collect()
    }

    /// Stores an object as if someone else had written it.
    pub fn put_object(&self, mut object: Value) {
        let mut world = self.world.lock().unwrap();
        world.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(world.resource_version.to_string());
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        world.objects.insert(name, object);
    }

    /// Bumps an object's resourceVersion, as a write by someone else would.
    pub fn touch(&self, name: &str) {
        let object = self.object(name).expect("exists");
        self.put_object(object);
    }
}

async fn answer(world: &Mutex<World>, request: Request<Body>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let body = request
        .into_body()
        .collect_bytes()
        .await
        .unwrap_or_default();
    let mut world = world.lock().unwrap();
    world.log.push(format!("{method} {path}"));
    let fault = world
        .faults
        .iter()
        .position(|f| f.method == method && path.ends_with(f.path_suffix.as_str()))
        .and_then(|i| world.faults.remove(i));
    match fault {
        Some(f) if f.applied => {
            serve(&mut world, method, &path, &body);
            status(f.status, "InternalError", "injected fault after applying")
        }
        Some(f) => status(f.status, "InternalError", "injected fault"),
        None => serve(&mut world, method, &path, &body),
    }
}

fn serve(world: &mut World, method: Method, path: &str, body: &[u8]) -> Response<Body> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // api/v1/namespaces/{ns}/configmaps[/{name}]
    let name = segments.get(5).map(|s| s.to_string());
    match (method, name) {
        (Method::GET, Some(name)) => match world.objects.get(&name) {
            Some(object) => ok(StatusCode::OK, object),
            None => status(404, "NotFound", &format!("configmaps \"{name}\" not found")),
        },
        (Method::POST, None) => {
            let mut object: Value = serde_json::from_slice(body).unwrap();
            let name = object["metadata"]["name"].as_str().unwrap().to_owned();
            if world.objects.contains_key(&name) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("configmaps \"{name}\" already exists"),
                );
            }
            if let Some(invalid) = too_large(&object) {
                return invalid;
            }
            world.resource_version += 1;
            object["metadata"]["resourceVersion"] = json!(world.resource_version.to_string());
            world.objects.insert(name, object.clone());
            ok(StatusCode::CREATED, &object)
        }
        (Method::PUT, Some(name)) => {
            let mut object: Value = serde_json::from_slice(body).unwrap();
            let Some(current) = world.objects.get(&name) else {
                return status(404, "NotFound", &format!("configmaps \"{name}\" not found"));
            };
            if object["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on configmaps \"{name}\": the object has been modified"
                    ),
                );
            }
            if let Some(invalid) = too_large(&object) {
                return invalid;
            }
            world.resource_version += 1;
            object["metadata"]["resourceVersion"] = json!(world.resource_version.to_string());
            world.objects.insert(name, object.clone());
            ok(StatusCode::OK, &object)
        }
        (method, name) => panic!("the fake API does not serve {method} {path} ({name:?})"),
    }
}

/// 422 for a ConfigMap over the limit, as the real server answers.
fn too_large(object: &Value) -> Option<Response<Body>> {
    use base64::Engine;
    let mut size = 0;
    if let Some(data) = object["data"].as_object() {
        size += data
            .values()
            .map(|v| v.as_str().map_or(0, str::len))
            .sum::<usize>();
    }
    if let Some(data) = object["binaryData"].as_object() {
        size += data
            .values()
            .map(|v| {
                base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap_or(""))
                    .unwrap()
                    .len()
            })
            .sum::<usize>();
    }
    (size > MAX_CONFIGMAP_BYTES).then(|| {
        status(
            422,
            "Invalid",
            "ConfigMap is invalid: []: Too long: must have at most 1048576 bytes",
        )
    })
}

fn ok(code: StatusCode, object: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(object).unwrap()))
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}
