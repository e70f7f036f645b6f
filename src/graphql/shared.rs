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

use super::schema::{Caller, Counted, Open, too_slow};
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
    struct Following {
        // Held, not read: the execution lasts while someone follows it.
        _group: Arc<Group>,
        rx: broadcast::Receiver<Arc<Response>>,
        last: Option<Arc<Response>>,
        _open: Open,
    }
    let state = Following {
        _group: group,
        rx,
        last: None,
        _open: Open::new(stats.clone()),
    };
    futures::stream::unfold(Some(state), |state| async move {
        let mut s = state?;
        match s.rx.recv().await {
            Ok(r) => {
                let out = copy(&r);
                s.last = Some(r);
                Some((out, Some(s)))
            }
            Err(broadcast::error::RecvError::Closed) => None,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let error = too_slow(s.last.as_deref().and_then(event_id));
                Some((
                    Response::from_errors(vec![error.into_server_error(Default::default())]),
                    None,
                ))
            }
        }
    })
    .boxed()
}

/// The `eventId` a subscription result carries, when its selection has one.
fn event_id(r: &Response) -> Option<i64> {
    let async_graphql::Value::Object(root) = &r.data else {
        return None;
    };
    let (_, async_graphql::Value::Object(item)) = root.iter().next()? else {
        return None;
    };
    match item.get("eventId")? {
        async_graphql::Value::Number(n) => n.as_i64(),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use std::{sync::atomic::Ordering, time::Duration};

    use async_graphql::value;
    use tokio::sync::mpsc;

    use super::*;

    /// An executor whose one subscription yields what the test sends; a
    /// second execution panics.
    #[derive(Clone)]
    struct Fed(Arc<parking_lot::Mutex<Option<mpsc::UnboundedReceiver<Response>>>>);

    impl Executor for Fed {
        async fn execute(&self, _: Request) -> Response {
            Response::default()
        }

        fn execute_stream(&self, _: Request, _: Option<Arc<Data>>) -> BoxStream<'static, Response> {
            let rx = self.0.lock().take().expect("executed twice");
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed()
        }
    }

    fn result(id: i64) -> Response {
        Response::new(value!({"messageAdded": {"eventId": id}}))
    }

    async fn next(s: &mut BoxStream<'static, Response>) -> Option<Response> {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("no result")
    }

    #[tokio::test]
    async fn a_subscriber_behind_the_others_is_cut_off_with_its_last_event_id() {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let sharing = Sharing::new(
            Fed(Arc::new(parking_lot::Mutex::new(Some(rx)))),
            2,
            stats.clone(),
        );
        let mut session = Data::default();
        session.insert(Caller::Anonymous);
        let session = Some(Arc::new(session));
        let request = || Request::new("subscription { messageAdded { eventId } }");
        let mut slow = sharing.execute_stream(request(), session.clone());
        let mut keeping_up = sharing.execute_stream(request(), session.clone());
        assert_eq!(stats.subscriptions.load(Ordering::Relaxed), 2);

        tx.send(result(1)).unwrap();
        assert_eq!(event_id(&next(&mut slow).await.unwrap()), Some(1));
        assert_eq!(event_id(&next(&mut keeping_up).await.unwrap()), Some(1));
        // Four more, two more than a subscriber may be behind by.
        for id in 2..=5 {
            tx.send(result(id)).unwrap();
            assert_eq!(event_id(&next(&mut keeping_up).await.unwrap()), Some(id));
        }
        let cut_off = next(&mut slow).await.unwrap();
        let error = &cut_off.errors[0];
        let extensions = error.extensions.as_ref().unwrap();
        assert_eq!(extensions.get("code"), Some(&value!("SUBSCRIBER_TOO_SLOW")));
        assert_eq!(extensions.get("lastEventId"), Some(&value!(1)));
        assert!(next(&mut slow).await.is_none(), "the subscription ended");
        assert_eq!(stats.subscriptions.load(Ordering::Relaxed), 1);

        // The execution ending ends the subscriptions it serves.
        drop(tx);
        assert!(next(&mut keeping_up).await.is_none());
        assert_eq!(stats.subscriptions.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn only_live_subscriptions_of_one_caller_share() {
        let mut anonymous = Data::default();
        anonymous.insert(Caller::Anonymous);
        let key_of = |query: &str| key(&Request::new(query), Some(&anonymous));
        let live = key_of("subscription { messageAdded { id } }");
        assert!(live.is_some());
        assert_eq!(live, key_of("subscription { messageAdded { id } }"));
        assert_ne!(live, key_of("subscription { messageAdded { id content } }"));
        assert_eq!(
            key_of("subscription { messageAdded(afterEventId: 3) { id } }"),
            None
        );
        assert_eq!(key_of("{ user(id: 1) { id } }"), None);
        assert_eq!(
            key(&Request::new("subscription { messageAdded { id } }"), None),
            None
        );
    }
}
