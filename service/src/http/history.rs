//! `GET /api/v1/history` and `GET /api/v1/peaks`: the history's views, with their parameters
//! checked (a bad one is a 400 naming it).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State as AxumState};
use serde::{Deserialize, Serialize};

use super::{ApiError, Http};
use crate::history::{Columns, DayPeak, peaks};
use crate::registry::UnixMillis;

/// At most this many buckets per answer: 14 days of minutes, with room.
const MAX_BUCKETS: u64 = 30_000;
const DEFAULT_SPAN: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_PEAK_DAYS: u32 = 7;

#[derive(Deserialize)]
pub struct HistoryQuery {
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
}

#[derive(Serialize)]
pub struct HistoryView {
    from: UnixMillis,
    to: UnixMillis,
    step_seconds: u64,
    /// Bucket starts.
    times: Vec<UnixMillis>,
    total: Columns,
    hosts: BTreeMap<String, Columns>,
}

pub async fn history(
    AxumState(http): AxumState<Http>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<HistoryView>, ApiError> {
    let Query(q) = query.map_err(rejected)?;
    let now = UnixMillis::now();
    let to = match q.to.as_deref() {
        Some(v) => millis("to", v)?,
        None => now,
    };
    let from = match q.from.as_deref() {
        Some(v) => millis("from", v)?,
        None => UnixMillis(to.0.saturating_sub(DEFAULT_SPAN.as_millis() as u64)),
    };
    let step = match q.step.as_deref() {
        None => Duration::from_secs(60),
        Some(v) => {
            let step = humantime::parse_duration(v).map_err(|e| {
                ApiError::bad(format!(
                    "step: {v:?} is not a duration like 1m, 10m or 1h ({e})"
                ))
            })?;
            if step < Duration::from_secs(60)
                || step.as_secs() % 60 != 0
                || step.subsec_nanos() != 0
            {
                return Err(ApiError::bad(format!(
                    "step: {v:?} must be a whole number of minutes, at least 1m"
                )));
            }
            step
        }
    };
    if from >= to {
        return Err(ApiError::bad("from must be before to"));
    }
    let buckets = (to.0 - from.0).div_ceil(step.as_millis() as u64);
    if buckets > MAX_BUCKETS {
        return Err(ApiError::bad(format!(
            "{buckets} buckets asked for, at most {MAX_BUCKETS}: use a larger step or a shorter range"
        )));
    }
    let range = http.state.history().range(from, to, step);
    Ok(Json(HistoryView {
        from,
        to,
        step_seconds: step.as_secs(),
        times: range.times,
        total: range.total,
        hosts: range.hosts.into_iter().collect(),
    }))
}

/// A query string that does not parse at all (a parameter given twice, say): a 400 in the
/// API's own shape, not axum's plain text.
fn rejected(rejection: QueryRejection) -> ApiError {
    ApiError::bad(format!("query: {}", rejection.body_text()))
}

fn millis(name: &str, value: &str) -> Result<UnixMillis, ApiError> {
    value.parse::<u64>().map(UnixMillis).map_err(|_| {
        ApiError::bad(format!(
            "{name}: {value:?} is not a time in Unix milliseconds"
        ))
    })
}

#[derive(Deserialize)]
pub struct PeaksQuery {
    days: Option<String>,
}

#[derive(Serialize)]
pub struct PeaksView {
    days: Vec<DayPeak>,
}

pub async fn peaks_view(
    AxumState(http): AxumState<Http>,
    query: Result<Query<PeaksQuery>, QueryRejection>,
) -> Result<Json<PeaksView>, ApiError> {
    let Query(q) = query.map_err(rejected)?;
    let history = http.state.history();
    let most = (history.retention().as_secs() / 86_400).max(1) as u32;
    let days = match q.days.as_deref() {
        None => DEFAULT_PEAK_DAYS.min(most),
        Some(v) => match v.parse::<u32>() {
            Ok(days) if (1..=most).contains(&days) => days,
            _ => {
                return Err(ApiError::bad(format!(
                    "days: {v:?} must be a whole number from 1 to {most} (the history's retention)"
                )));
            }
        },
    };
    Ok(Json(PeaksView {
        days: peaks(&history, UnixMillis::now(), days),
    }))
}
