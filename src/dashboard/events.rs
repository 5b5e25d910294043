//! `/events`: the fleet's node events as server-sent events, from the same
//! event source as `WatchNodes`.
//!
//! Invariants:
//! - Every event but a snapshot's nodes carries its revision as its SSE id,
//!   so the browser's automatic reconnect (`Last-Event-ID`) resumes exactly
//!   after the last event the page applied. A snapshot's nodes carry none: a
//!   stream cut inside a snapshot starts over rather than resume half-way.
//! - A revision the history no longer holds (or one this database never
//!   issued: it was replaced) is answered with a `reset` event and a fresh
//!   snapshot, never with a gap.
//! - A stream ends when its watch ends (the page fell behind, or the
//!   coordinator stops), with an `end` event saying why; the browser then
//!   reconnects from its last revision.

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::{StreamExt, stream};
use serde::Deserialize;
use tracing::debug;

use super::{Dashboard, WatchRefused, json_error, session};
use crate::{proto, wire::json::EventJson};

/// How soon a browser reconnects after the stream drops.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// Comment lines keep an idle connection open through proxies.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
pub struct EventsQuery {
    /// Where to resume when the request has no `Last-Event-ID`: 0 (or
    /// absent) asks for a snapshot.
    since: Option<u64>,
}

fn sse_event(event: &proto::NodeEvent) -> Event {
    let sse = Event::default().event("node");
    let sse = if event.kind == i32::from(proto::NodeEventKind::Snapshot) {
        sse
    } else {
        sse.id(event.revision.to_string())
    };
    sse.json_data(EventJson::from(event))
        .unwrap_or_else(|error| Event::default().event("end").data(error.to_string()))
}

/// Where the request asks to resume: `Last-Event-ID` (the browser's
/// reconnect), else `?since=`, else 0 for a snapshot.
fn resume_from(headers: &HeaderMap, query: &EventsQuery) -> Result<u64, MalformedLastEventId> {
    let Some(last) = headers.get("last-event-id") else {
        return Ok(query.since.unwrap_or(0));
    };
    let last = last.to_str().unwrap_or_default().trim();
    if last.is_empty() {
        return Ok(query.since.unwrap_or(0));
    }
    last.parse().map_err(|_| MalformedLastEventId)
}

/// A `Last-Event-ID` that is not a revision.
#[derive(Debug)]
struct MalformedLastEventId;

impl IntoResponse for MalformedLastEventId {
    fn into_response(self) -> Response {
        json_error(
            StatusCode::BAD_REQUEST,
            "Last-Event-ID must be a revision (a whole number), as /events sent it",
        )
    }
}

pub async fn events(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Response {
    if !session::admitted(dashboard.admin_token.as_ref(), &headers) {
        return session::unauthorized();
    }
    let since = match resume_from(&headers, &query) {
        Ok(since) => since,
        Err(malformed) => return malformed.into_response(),
    };
    let (reset, watch) = match dashboard.fleet.watch(since).await {
        Ok(watch) => (None, watch),
        Err(WatchRefused::OutOfRange(why)) => match dashboard.fleet.watch(0).await {
            Ok(watch) => (Some(why), watch),
            Err(refused) => return unavailable(&refused),
        },
        Err(refused) => return unavailable(&refused),
    };
    debug!(
        since,
        reset = reset.is_some(),
        "dashboard events stream opened"
    );
    let hello = Event::default().retry(RECONNECT_AFTER).comment("muster");
    let reset = reset.map(|why| Event::default().event("reset").data(why));
    let first = stream::iter(std::iter::once(hello).chain(reset));
    // A watch's error is its last item: the stream ends after saying why.
    let events = watch.scan(false, |ended, next| {
        if *ended {
            return std::future::ready(None);
        }
        *ended = next.is_err();
        std::future::ready(Some(match next {
            Ok(event) => sse_event(&event),
            Err(why) => Event::default().event("end").data(why),
        }))
    });
    let stream = first
        .chain(events)
        .map(Ok::<_, Infallible>)
        .take_until(dashboard.shutdown.clone().cancelled_owned());
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

fn unavailable(refused: &WatchRefused) -> Response {
    json_error(StatusCode::SERVICE_UNAVAILABLE, &refused.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::{body::Body, http::Request};
    use futures::{FutureExt, future::BoxFuture};
    use metrics_exporter_prometheus::PrometheusBuilder;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    use super::*;
    use crate::dashboard::{Fleet, NodeEvents};

    /// History holds revisions 5 to 9; the database has issued up to 9.
    struct FakeFleet;

    fn event(revision: u64, kind: proto::NodeEventKind, node_id: &str) -> proto::NodeEvent {
        proto::NodeEvent {
            revision,
            kind: kind.into(),
            node: (!node_id.is_empty()).then(|| proto::Node {
                node_id: node_id.into(),
                state: proto::NodeState::Online.into(),
                ..Default::default()
            }),
            reason: String::new(),
            database_id: "db-1".into(),
        }
    }

    impl Fleet for FakeFleet {
        fn nodes(&self) -> proto::ListNodesResponse {
            proto::ListNodesResponse::default()
        }

        fn watch(&self, since: u64) -> BoxFuture<'static, Result<NodeEvents, WatchRefused>> {
            use proto::NodeEventKind::{Changed, Snapshot, SnapshotEnd};
            let answer = match since {
                0 => Ok(vec![
                    event(9, Snapshot, "gpu-1"),
                    event(9, Snapshot, "gpu-2"),
                    event(9, SnapshotEnd, ""),
                ]),
                5..=9 => Ok(((since + 1)..=9)
                    .map(|r| event(r, Changed, "gpu-1"))
                    .collect()),
                _ => Err(WatchRefused::OutOfRange(format!(
                    "revision {since} is gone"
                ))),
            };
            async move {
                let events = answer?;
                let items = events
                    .into_iter()
                    .map(Ok)
                    .chain([Err("fell behind".to_owned())]);
                Ok(futures::stream::iter(items).boxed())
            }
            .boxed()
        }
    }

    async fn get_events(uri: &str, last_event_id: Option<&str>) -> (StatusCode, String) {
        let dashboard = crate::dashboard::Dashboard {
            fleet: Arc::new(FakeFleet),
            admin_token: None,
            shutdown: CancellationToken::new(),
        };
        let metrics = PrometheusBuilder::new().build_recorder().handle();
        let mut request = Request::get(uri);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = crate::dashboard::router(dashboard, metrics)
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn a_snapshot_carries_no_ids_until_its_end() {
        let (status, body) = get_events("/events", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("retry: 1000\n"), "{body}");
        assert_eq!(body.matches("id: ").count(), 1, "{body}");
        assert!(body.contains("id: 9\n"), "{body}");
        assert_eq!(body.matches(r#""kind":"snapshot""#).count(), 2, "{body}");
        assert!(
            body.ends_with("event: end\ndata: fell behind\n\n"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn a_reconnect_resumes_after_its_last_event_id() {
        let (_, body) = get_events("/events?since=1", Some("7")).await;
        assert!(
            !body.contains("id: 7\n") && body.contains("id: 8\n") && body.contains("id: 9\n"),
            "{body}"
        );
        assert!(!body.contains("snapshot"), "{body}");
        let (_, body) = get_events("/events?since=8", None).await;
        assert!(
            body.contains("id: 9\n") && !body.contains("id: 8\n"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn a_revision_history_no_longer_holds_gets_a_reset_and_a_snapshot() {
        let (status, body) = get_events("/events", Some("2")).await;
        assert_eq!(status, StatusCode::OK);
        let reset = body
            .find("event: reset\ndata: revision 2 is gone")
            .expect(&body);
        let snapshot = body.find(r#""kind":"snapshot""#).expect(&body);
        assert!(reset < snapshot, "{body}");
    }

    #[tokio::test]
    async fn a_malformed_last_event_id_is_refused() {
        let (status, body) = get_events("/events", Some("x")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("Last-Event-ID"), "{body}");
    }

    #[test]
    fn resume_prefers_the_last_event_id_and_refuses_a_malformed_one() {
        let query = EventsQuery { since: Some(3) };
        let mut headers = HeaderMap::new();
        assert_eq!(resume_from(&headers, &query).unwrap(), 3);
        headers.insert("last-event-id", "12".parse().unwrap());
        assert_eq!(resume_from(&headers, &query).unwrap(), 12);
        headers.insert("last-event-id", "twelve".parse().unwrap());
        let refused = resume_from(&headers, &query).unwrap_err().into_response();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            resume_from(&HeaderMap::new(), &EventsQuery { since: None }).unwrap(),
            0
        );
    }
}
