//! Group commit for registrations. One thread, with one connection, takes
//! every registration waiting and commits them in one transaction, so a
//! storm of registrations (a whole fleet reconnecting after a restart) costs
//! a few transactions instead of one each, and writers no longer queue on
//! SQLite's lock.
//!
//! A registration refused for its node secret writes nothing and does not
//! fail the batch; a later registration of the same id in the batch sees the
//! rows written before it.
//!
//! Invariants: a caller is answered only after its row, and its
//! `registered` event, are committed, and
//! only while the database file is still at its path (see
//! `EventLog::transaction`); a batch that fails for one of its rows
//! is retried one registration per transaction, so one bad registration
//! fails only itself, while a batch that fails because the database is
//! unavailable fails as a whole, at once; a registration whose caller has
//! gone is not written.

use std::{sync::Arc, time::SystemTime};

use tokio::sync::{mpsc, oneshot};

use super::{Connections, Enrolled, StoreError, enroll_in, events::EventLog, file::DatabaseFile};
use crate::{auth::SecretHash, node::Registration};

/// Registrations committed together at most.
const MAX_BATCH: usize = 1024;
/// Registrations waiting before callers wait to queue theirs.
const QUEUE: usize = 4096;

struct Request {
    registration: Registration,
    secret_hash: SecretHash,
    now: SystemTime,
    reply: oneshot::Sender<Result<Enrolled, StoreError>>,
}

/// The handle; the thread ends once every handle is dropped.
#[derive(Clone)]
pub(super) struct Enroller {
    requests: mpsc::Sender<Request>,
}

impl Enroller {
    pub(super) fn start(
        connections: Arc<Connections>,
        file: Option<Arc<DatabaseFile>>,
        events: Arc<EventLog>,
    ) -> Result<Self, StoreError> {
        let (requests, receiver) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("muster-enroll".to_owned())
            .spawn(move || serve(&connections, file.as_deref(), &events, receiver))
            .map_err(StoreError::EnrollerStart)?;
        Ok(Self { requests })
    }

    pub(super) async fn enroll(
        &self,
        registration: Registration,
        secret_hash: SecretHash,
        now: SystemTime,
    ) -> Result<Enrolled, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            registration,
            secret_hash,
            now,
            reply,
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| StoreError::EnrollerStopped)?;
        answer.await.map_err(|_| StoreError::EnrollerStopped)?
    }
}

fn serve(
    connections: &Connections,
    file: Option<&DatabaseFile>,
    events: &EventLog,
    mut requests: mpsc::Receiver<Request>,
) {
    while let Some(first) = requests.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH
            && let Ok(next) = requests.try_recv()
        {
            batch.push(next);
        }
        batch.retain(|request| !request.reply.is_closed());
        if !batch.is_empty() {
            commit(connections, file, events, batch);
        }
    }
}

fn commit(
    connections: &Connections,
    file: Option<&DatabaseFile>,
    events: &EventLog,
    batch: Vec<Request>,
) {
    let now = SystemTime::now();
    let together = connections.write(|conn| {
        events.transaction(file, conn, now, |conn, recorder| {
            batch
                .iter()
                .map(|request| {
                    enroll_in(
                        conn,
                        recorder,
                        &request.registration,
                        request.secret_hash,
                        request.now,
                    )
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })
    });
    match together {
        Ok(enrollments) => {
            for (request, enrollment) in batch.into_iter().zip(enrollments) {
                let _ = request.reply.send(Ok(enrollment));
            }
        }
        Err(error) if batch.len() == 1 => {
            if let Some(request) = batch.into_iter().next() {
                let _ = request.reply.send(Err(error));
            }
        }
        Err(error) if error.is_unavailable() => {
            let cause = Arc::new(error);
            for request in batch {
                let _ = request.reply.send(Err(StoreError::Batch(cause.clone())));
            }
        }
        Err(_) => {
            for request in batch {
                let alone = connections.write(|conn| {
                    events.transaction(file, conn, now, |conn, recorder| {
                        enroll_in(
                            conn,
                            recorder,
                            &request.registration,
                            request.secret_hash,
                            request.now,
                        )
                    })
                });
                let _ = request.reply.send(alone);
            }
        }
    }
}
