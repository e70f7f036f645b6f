//! One execution for identical live subscriptions.
//!
//! async-graphql executes a subscription's selection set for every
//! subscriber and event: with 10,000 WebSocket subscribers of one document,
//! that was the largest part of the server's work after the socket writes.
//! Subscribers that send the same request (document, operation, variables)
//! as the same caller get one execution between them here, and each is sent
//! its results. A subscription that replays history (`afterEventId`) is run
//! on its own: where it starts is its own.

use std::{
    any::TypeId,
    collections::HashMap,
    sync::{Arc, Weak},
};

use async_graphql::{
    Data, Executor, Request, Response,
    parser::{
        parse_query,
        types::{DocumentOperations, OperationType, Selection},
    },
};
use futures::{StreamExt, stream::BoxStream};
use tokio::sync::broadcast;
use tokio_util::task::AbortOnDropHandle;

use super::{
    error::coded,
    schema::{Caller, Counted, Open},
};
use crate::state::Stats;

/// The argument that makes a subscription start in the past.
const AFTER: &str = "afterEventId";

/// What makes two subscription requests the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    caller: String,
    operation: Option<String>,
    variables: String,
    query: String,
}

type Groups = parking_lot::Mutex<HashMap<Key, Weak<Group>>>;

/// An executor that runs identical live subscriptions once.
#[derive(Clone)]
pub struct Sharing<E> {
    inner: E,
    groups: Arc<Groups>,
    /// Results a subscriber may fall behind by before it is cut off.
    capacity: usize,
    stats: Arc<Stats>,
}

impl<E: Executor> Sharing<E> {
    pub fn new(inner: E, capacity: usize, stats: Arc<Stats>) -> Self {
        Sharing {
            inner,
            groups: Arc::default(),
            capacity: capacity.max(1),
            stats,
        }
    }

    fn join(
        &self,
        key: Key,
        request: Request,
        session: Option<Arc<Data>>,
    ) -> BoxStream<'static, Response> {
        // Looked up and upgraded under the lock, dropped after it: the last
        // reference's drop takes the lock too.
        let found = self.groups.lock().get(&key).and_then(Weak::upgrade);
        if let Some(group) = found
            && let Some(rx) = group.subscribe()
        {
            return follow(group, rx, &self.stats);
        }
        let (tx, rx) = broadcast::channel(self.capacity);
        // The execution is not a client's subscription: each subscriber counts.
        let results = self
            .inner
            .execute_stream(request.data(Counted(false)), session);
        let group = Arc::new_cyclic(|me: &Weak<Group>| {
            let me = me.clone();
            let sender = tx.clone();
            let groups = Arc::downgrade(&self.groups);
            let task_key = key.clone();
            let task = tokio::spawn(async move {
                let key = task_key;
                let mut results = results;
                while let Some(r) = results.next().await {
                    // No receivers: the group is being dropped, and this task with it.
                    let _ = sender.send(Arc::new(r));
                }
                // Ended (an error, or shutdown): no one joins it any more.
                let group = me.upgrade();
                if let Some(g) = &group {
                    *g.sender.lock() = None;
                }
                if let Some(groups) = groups.upgrade() {
                    let mut groups = groups.lock();
                    if groups.get(&key).is_some_and(|w| w.ptr_eq(&me)) {
                        groups.remove(&key);
                    }
                }
                drop(group);
            });
            Group {
                sender: parking_lot::Mutex::new(Some(tx)),
                key: key.clone(),
                groups: Arc::downgrade(&self.groups),
                _task: AbortOnDropHandle::new(task),
            }
        });
        self.groups.lock().insert(key, Arc::downgrade(&group));
        follow(group, rx, &self.stats)
    }
}

/// One execution and the subscribers it serves.
struct Group {
    /// `None` once the execution has ended.
    sender: parking_lot::Mutex<Option<broadcast::Sender<Arc<Response>>>>,
    key: Key,
    groups: Weak<Groups>,
    _task: AbortOnDropHandle<()>,
}

impl Group {
    fn subscribe(&self) -> Option<broadcast::Receiver<Arc<Response>>> {
        self.sender
            .lock()
            .as_ref()
            .map(broadcast::Sender::subscribe)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(groups) = self.groups.upgrade() {
            let mut groups = groups.lock();
            if groups.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
                groups.remove(&self.key);
            }
        }
    }
}

/// One subscriber's results from its group.
fn follow(
    group: Arc<Group>,
    rx: broadcast::Receiver<Arc<Response>>,
    stats: &Arc<Stats>,
) -> BoxStream<'static, Response> {
    let open = Open::new(stats.clone());
    futures::stream::unfold(Some((group, rx, open)), |state| async move {
        let (group, mut rx, open) = state?;
        match rx.recv().await {
            Ok(r) => Some((copy(&r), Some((group, rx, open)))),
            Err(broadcast::error::RecvError::Closed) => None,
            Err(broadcast::error::RecvError::Lagged(_)) => Some((
                Response::from_errors(vec![
                    coded(
                        "SUBSCRIBER_TOO_SLOW",
                        "Subscription fell behind and was ended; subscribe again with \
                         afterEventId set to the last eventId received",
                    )
                    .into_server_error(Default::default()),
                ]),
                None,
            )),
        }
    })
    .boxed()
}

/// A subscriber's own copy of a shared result.
fn copy(r: &Response) -> Response {
    let mut out = Response::new(r.data.clone());
    out.errors = r.errors.clone();
    out.extensions = r.extensions.clone();
    out
}

/// The key under which `request` may share an execution, or `None` when it
/// must run on its own: not a subscription, one that replays history, or
/// one carrying data or extensions that could make its results its own.
fn key(request: &Request, session: Option<&Data>) -> Option<Key> {
    if !request.data.is_empty() || !request.extensions.is_empty() || !request.uploads.is_empty() {
        return None;
    }
    let caller = match session?
        .get(&TypeId::of::<Caller>())?
        .downcast_ref::<Caller>()?
    {
        Caller::Anonymous => "anonymous".to_owned(),
        Caller::User(p) => format!("{}:{:?}", p.user_id, p.role),
        // Refused per subscriber, with its own message.
        Caller::Invalid(_) => return None,
    };
    let document = parse_query(&request.query).ok()?;
    let operation = match (&document.operations, &request.operation_name) {
        (DocumentOperations::Single(op), _) => op,
        (DocumentOperations::Multiple(ops), Some(name)) => ops.get(name.as_str())?,
        (DocumentOperations::Multiple(_), None) => return None,
    };
    if operation.node.ty != OperationType::Subscription {
        return None;
    }
    for selection in &operation.node.selection_set.node.items {
        let Selection::Field(field) = &selection.node else {
            return None;
        };
        if field
            .node
            .arguments
            .iter()
            .any(|(name, _)| name.node == AFTER)
        {
            return None;
        }
    }
    Some(Key {
        caller,
        operation: request.operation_name.clone(),
        variables: serde_json::to_string(&request.variables).ok()?,
        query: request.query.clone(),
    })
}

impl<E: Executor> Executor for Sharing<E> {
    async fn execute(&self, request: Request) -> Response {
        self.inner.execute(request).await
    }

    fn execute_stream(
        &self,
        request: Request,
        session: Option<Arc<Data>>,
    ) -> BoxStream<'static, Response> {
        match key(&request, session.as_deref()) {
            Some(key) => self.join(key, request, session),
            None => self.inner.execute_stream(request, session),
        }
    }
}
