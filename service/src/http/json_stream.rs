//! JSON answers whose big array is serialized piece by piece as the client reads it. The full
//! user list at 200,000 users is 20 MB (`/api/v1/summary`) to 38 MB (`/api/v1/users`) of JSON;
//! rendering it whole beside the registry took the process from 146 MB to a peak of 257–275 MB,
//! streamed the peak is 222 MB (measured, README "Sizing"): a pod's memory limit decides whether
//! an administrator may look at the users.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Items serialized per piece: about 100 KB of JSON.
const PIECE: usize = 1024;

/// The bytes of `head`, then `items` as a JSON array, then `tail`, in pieces.
pub fn pieces<T: Serialize>(
    head: Vec<u8>,
    items: Vec<T>,
    tail: &'static [u8],
) -> impl Iterator<Item = Vec<u8>> {
    let mut items = items.into_iter().peekable();
    let mut started = false;
    let mut head = Some(head);
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut out = head.take().unwrap_or_default();
        if !started {
            out.push(b'[');
            started = true;
        }
        for _ in 0..PIECE {
            let Some(item) = items.next() else { break };
            serde_json::to_writer(&mut out, &item).expect("a view serializes");
            if items.peek().is_some() {
                out.push(b',');
            }
        }
        if items.peek().is_none() {
            out.push(b']');
            out.extend_from_slice(tail);
            done = true;
        }
        Some(out)
    })
}

/// A `200 application/json` answer streamed from [`pieces`].
pub fn response<T: Serialize + Send + 'static>(
    head: Vec<u8>,
    items: Vec<T>,
    tail: &'static [u8],
) -> Response {
    let stream = futures_util::stream::iter(pieces(head, items, tail).map(Ok::<_, Infallible>));
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `object` serialized with `field` appended as an array streamed from `items` (the object's
/// other fields first).
pub fn object_with_array<O: Serialize, T: Serialize + Send + 'static>(
    object: &O,
    field: &str,
    items: Vec<T>,
) -> Response {
    let mut head = serde_json::to_vec(object).expect("a view serializes");
    debug_assert_eq!(head.last(), Some(&b'}'));
    head.pop();
    if head.len() > 1 {
        head.push(b',');
    }
    serde_json::to_writer(&mut head, field).expect("a field name serializes");
    head.push(b':');
    response(head, items, b"}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Item {
        name: String,
        n: usize,
    }

    fn items(n: usize) -> Vec<Item> {
        (0..n)
            .map(|n| Item {
                name: format!("LAB\\user{n} \"quoted\""),
                n,
            })
            .collect()
    }

    #[test]
    fn the_pieces_are_the_json_of_the_whole_array() {
        for n in [0, 1, 2, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 7] {
            let streamed: Vec<u8> = pieces(Vec::new(), items(n), b"").flatten().collect();
            assert_eq!(
                streamed,
                serde_json::to_vec(&items(n)).unwrap(),
                "{n} items"
            );
            let count = pieces(Vec::new(), items(n), b"").count();
            assert_eq!(count, n.div_ceil(PIECE).max(1), "{n} items in pieces");
        }
    }

    #[test]
    fn an_object_gets_the_array_as_its_last_field() {
        #[derive(Serialize)]
        struct Head {
            active: usize,
        }
        let head = serde_json::to_vec(&Head { active: 3 }).unwrap();
        let mut with = head.clone();
        with.pop();
        with.extend_from_slice(b",\"users\":");
        let body: Vec<u8> = pieces(with, items(3), b"}").flatten().collect();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["active"], 3);
        assert_eq!(value["users"], serde_json::to_value(items(3)).unwrap());
    }
}
