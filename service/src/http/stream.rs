//! `GET /api/v1/stream`: the counts as server-sent events, for the page and any dashboard that
//! wants a change within a second without polling. One `counts` event at connect, then one
//! after each change of membership (bursts within 100 ms are one event).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State as AxumState;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Serialize;

use super::Http;
use crate::state::State;

const COALESCE: Duration = Duration::from_millis(100);
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Serialize)]
struct Counts {
    active_users: usize,
    active_sessions: usize,
    hosts: BTreeMap<String, usize>,
}

fn counts(state: &State) -> Counts {
    let hosts = state.registry().hosts();
    Counts {
        active_users: state.registry().active_users(),
        active_sessions: hosts.iter().map(|h| h.active_sessions).sum(),
        hosts: hosts
            .into_iter()
            .map(|h| (h.host, h.active_users))
            .collect(),
    }
}

pub async fn stream(
    AxumState(http): AxumState<Http>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = http.state.subscribe_membership();
    let start = (http.state.clone(), changes, http.stop.clone(), true);
    let events =
        futures_util::stream::unfold(start, |(state, mut changes, mut stop, first)| async move {
            if !first {
                // The stream ends with the service, so that HTTP's graceful shutdown does not wait
                // for clients that never hang up.
                tokio::select! {
                    changed = changes.changed() => changed.ok()?,
                    () = stop.requested() => return None,
                }
                tokio::time::sleep(COALESCE).await;
                changes.borrow_and_update();
            }
            let event = Event::default()
                .event("counts")
                .json_data(counts(&state))
                .ok()?;
            Some((Ok(event), (state, changes, stop, false)))
        });
    Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}
