//! The GraphQL schema of SPEC §4, with Strawberry's naming (camelCase fields
//! and arguments, `Int` ids, `DateTime`). Resolvers call the domain and
//! nothing else; the schema knows nothing about HTTP or WebSockets — the
//! transport puts the caller's [`Principal`] (if any) into the request data.

use std::sync::{Arc, atomic::Ordering};

use async_graphql::{Context, ErrorExtensions, Object, Result, Subscription};
use chrono::{DateTime, SecondsFormat, Utc};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{
    error::{coded, gql_error},
    loaders::{
        CommentsByPost, FriendsOf, PostsByAuthor, UserLoader, loader, prefetch_posts,
        prefetch_users,
    },
};
use crate::{
    auth::Principal,
    domain::{self, Domain, NewPost, NewUser, Page, PostPatch},
    error::Error,
    events::{EventFilter, Item},
    state::Stats,
};

/// The caller as the transport established it: absent, verified, or a token
/// that failed verification (which every write reports).
#[derive(Debug, Clone)]
pub enum Caller {
    Anonymous,
    User(Principal),
    Invalid(String),
}

fn caller(ctx: &Context<'_>) -> Result<Principal> {
    match ctx.data::<Caller>()? {
        Caller::User(p) => Ok(p.clone()),
        Caller::Anonymous => Err(coded("UNAUTHENTICATED", "Not authenticated")),
        Caller::Invalid(m) => Err(coded("UNAUTHENTICATED", m.clone())),
    }
}

fn id32(id: i64) -> i32 {
    // Ids are issued by the database from 1 upward; 2^31 rows of one kind is
    // beyond what prism is built for, and saturating keeps a bad row visible.
    i32::try_from(id).unwrap_or(i32::MAX)
}

fn page(limit: Option<i32>, offset: Option<i32>) -> Result<Page> {
    Page::new(limit.map(i64::from), offset.map(i64::from)).map_err(gql_error)
}

/// Maps "not found" to `null`, as the seed's resolvers returned `None`.
fn optional<T>(r: crate::error::Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(gql_error(e)),
    }
}

/// A user of the system.
pub struct User(pub domain::User);

#[Object]
impl User {
    async fn id(&self) -> i32 {
        id32(self.0.id)
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn email(&self) -> &str {
        &self.0.email
    }
    async fn age(&self) -> Option<i32> {
        self.0.age
    }
    /// The user's posts, oldest first.
    async fn posts(&self, ctx: &Context<'_>) -> Result<Vec<Post>> {
        let posts = loader::<PostsByAuthor>(ctx)?
            .load_one(self.0.id)
            .await?
            .unwrap_or_default();
        prefetch_posts(ctx, &ctx.look_ahead(), &posts).await?;
        Ok(posts.into_iter().map(Post::from).collect())
    }
    /// The user's friends.
    async fn friends(&self, ctx: &Context<'_>) -> Result<Vec<User>> {
        let friends = loader::<FriendsOf>(ctx)?
            .load_one(self.0.id)
            .await?
            .unwrap_or_default();
        let ids: Vec<i64> = friends.iter().map(|u| u.id).collect();
        prefetch_users(ctx, &ctx.look_ahead(), &ids).await?;
        Ok(friends.into_iter().map(User).collect())
    }
}

/// A blog post.
pub struct Post(pub domain::Post, pub Option<i64>);

impl From<domain::Post> for Post {
    fn from(p: domain::Post) -> Self {
        Post(p, None)
    }
}

#[Object]
impl Post {
    async fn id(&self) -> i32 {
        id32(self.0.id)
    }
    async fn title(&self) -> &str {
        &self.0.title
    }
    async fn content(&self) -> &str {
        &self.0.content
    }
    async fn author_id(&self) -> i32 {
        id32(self.0.author_id)
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// The post's author.
    async fn author(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        let user = loader::<UserLoader>(ctx)?
            .load_one(self.0.author_id)
            .await?;
        Ok(user.map(User))
    }
    /// Comments on the post, oldest first.
    async fn comments(&self, ctx: &Context<'_>) -> Result<Vec<Comment>> {
        let comments = loader::<CommentsByPost>(ctx)?
            .load_one(self.0.id)
            .await?
            .unwrap_or_default();
        Ok(comments.into_iter().map(Comment).collect())
    }
    /// When the post was last changed (its creation time until then).
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
    /// In `postCreated`, the event-log id that announced the post: subscribe
    /// with `afterEventId` set to the last one seen to resume without a gap.
    /// Null elsewhere.
    async fn event_id(&self) -> Option<i64> {
        self.1
    }
}

/// A comment on a post.
pub struct Comment(pub domain::Comment);

#[Object]
impl Comment {
    async fn id(&self) -> i32 {
        id32(self.0.id)
    }
    async fn content(&self) -> &str {
        &self.0.content
    }
    async fn post_id(&self) -> i32 {
        id32(self.0.post_id)
    }
    async fn user_id(&self) -> i32 {
        id32(self.0.user_id)
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

/// A chat message.
pub struct Message(pub domain::Message, pub Option<i64>);

#[Object]
impl Message {
    async fn id(&self) -> i32 {
        id32(self.0.id)
    }
    async fn content(&self) -> &str {
        &self.0.content
    }
    async fn user_id(&self) -> i32 {
        id32(self.0.user_id)
    }
    /// When the message was sent, ISO-8601.
    async fn timestamp(&self) -> String {
        self.0
            .timestamp
            .to_rfc3339_opts(SecondsFormat::Micros, true)
    }
    /// In `messageAdded`, the event-log id that announced the message:
    /// subscribe with `afterEventId` set to the last one seen to resume
    /// without a gap. Null elsewhere.
    async fn event_id(&self) -> Option<i64> {
        self.1
    }
}

pub struct Query;

#[Object]
impl Query {
    /// A user by id, or null.
    async fn user(&self, ctx: &Context<'_>, id: i32) -> Result<Option<User>> {
        let domain = ctx.data::<Domain>()?;
        let user = optional(domain.get_user(id.into()).await)?;
        if let Some(u) = &user {
            prefetch_users(ctx, &ctx.look_ahead(), &[u.id]).await?;
        }
        Ok(user.map(|u| User((*u).clone())))
    }

    /// Users in id order (at most 100 without `limit`, `limit` capped at 1000).
    async fn users(
        &self,
        ctx: &Context<'_>,
        limit: Option<i32>,
        offset: Option<i32>,
    ) -> Result<Vec<User>> {
        let users = ctx
            .data::<Domain>()?
            .list_users(page(limit, offset)?)
            .await
            .map_err(gql_error)?;
        let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
        prefetch_users(ctx, &ctx.look_ahead(), &ids).await?;
        Ok(users.into_iter().map(User).collect())
    }

    /// A post by id, or null.
    async fn post(&self, ctx: &Context<'_>, id: i32) -> Result<Option<Post>> {
        let domain = ctx.data::<Domain>()?;
        let post = optional(domain.get_post(id.into()).await)?;
        if let Some(p) = &post {
            prefetch_posts(ctx, &ctx.look_ahead(), std::slice::from_ref(p)).await?;
        }
        Ok(post.map(Post::from))
    }

    /// Posts in id order, optionally by one author.
    async fn posts(
        &self,
        ctx: &Context<'_>,
        author_id: Option<i32>,
        limit: Option<i32>,
        offset: Option<i32>,
    ) -> Result<Vec<Post>> {
        let posts = ctx
            .data::<Domain>()?
            .list_posts(author_id.map(i64::from), page(limit, offset)?)
            .await
            .map_err(gql_error)?;
        prefetch_posts(ctx, &ctx.look_ahead(), &posts).await?;
        Ok(posts.into_iter().map(Post::from).collect())
    }

    /// Search posts by title or content (case-insensitive).
    async fn search_posts(
        &self,
        ctx: &Context<'_>,
        query: String,
        #[graphql(default = 10)] limit: i32,
        #[graphql(default = 0)] offset: i32,
    ) -> Result<Vec<Post>> {
        let posts = ctx
            .data::<Domain>()?
            .search_posts(&query, page(Some(limit), Some(offset))?)
            .await
            .map_err(gql_error)?;
        prefetch_posts(ctx, &ctx.look_ahead(), &posts).await?;
        Ok(posts.into_iter().map(Post::from).collect())
    }

    /// Get user with all their posts in one query.
    async fn user_with_posts(&self, ctx: &Context<'_>, user_id: i32) -> Result<Option<User>> {
        self.user(ctx, user_id).await
    }
}

pub struct Mutation;

#[Object]
impl Mutation {
    /// Create a user (needs a token).
    async fn create_user(
        &self,
        ctx: &Context<'_>,
        name: String,
        email: String,
        age: Option<i32>,
    ) -> Result<User> {
        let by = caller(ctx)?;
        let user = ctx
            .data::<Domain>()?
            .create_user(
                &by,
                NewUser {
                    name,
                    email,
                    age: age.map(i64::from),
                },
            )
            .await
            .map_err(gql_error)?;
        Ok(User(user))
    }

    /// Publish a post as `authorId` (yourself, unless you are an admin).
    async fn create_post(
        &self,
        ctx: &Context<'_>,
        title: String,
        content: String,
        author_id: i32,
    ) -> Result<Post> {
        let by = caller(ctx)?;
        let post = ctx
            .data::<Domain>()?
            .create_post(
                &by,
                NewPost {
                    title,
                    content,
                    author_id: Some(author_id.into()),
                },
            )
            .await
            .map_err(gql_error)?;
        Ok(Post(post, None))
    }

    /// Update post fields; null when the post does not exist. As in the seed,
    /// an empty `title` or `content` leaves that field as it is.
    async fn update_post(
        &self,
        ctx: &Context<'_>,
        post_id: i32,
        title: Option<String>,
        content: Option<String>,
    ) -> Result<Option<Post>> {
        let by = caller(ctx)?;
        let patch = PostPatch {
            title: title.filter(|t| !t.is_empty()),
            content: content.filter(|c| !c.is_empty()),
        };
        let domain = ctx.data::<Domain>()?;
        Ok(optional(domain.update_post(&by, post_id.into(), patch).await)?.map(Post::from))
    }

    /// Delete a post; false when it did not exist.
    async fn delete_post(&self, ctx: &Context<'_>, post_id: i32) -> Result<bool> {
        let by = caller(ctx)?;
        let domain = ctx.data::<Domain>()?;
        Ok(optional(domain.delete_post(&by, post_id.into()).await)?.is_some())
    }

    /// Comment on a post as yourself.
    async fn create_comment(
        &self,
        ctx: &Context<'_>,
        post_id: i32,
        content: String,
    ) -> Result<Comment> {
        let by = caller(ctx)?;
        let comment = ctx
            .data::<Domain>()?
            .create_comment(&by, post_id.into(), &content, None)
            .await
            .map_err(gql_error)?;
        Ok(Comment(comment))
    }

    /// Send a message as `userId` (yourself, unless you are an admin).
    async fn send_message(
        &self,
        ctx: &Context<'_>,
        content: String,
        user_id: i32,
    ) -> Result<Message> {
        let by = caller(ctx)?;
        let message = ctx
            .data::<Domain>()?
            .send_message(&by, &content, Some(user_id.into()))
            .await
            .map_err(gql_error)?;
        Ok(Message(message, None))
    }
}

pub struct Subscription;

/// Counts one client's open subscription for `/admin/stats` while it lives.
pub(super) struct Open(Arc<Stats>);

impl Open {
    pub(super) fn new(stats: Arc<Stats>) -> Self {
        stats.subscriptions.fetch_add(1, Ordering::Relaxed);
        Open(stats)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.subscriptions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The error that ends a subscription which fell behind, naming the last
/// event id it was sent when that is known.
pub(super) fn too_slow(last_id: Option<i64>) -> async_graphql::Error {
    coded(
        "SUBSCRIBER_TOO_SLOW",
        "Subscription fell behind and was ended; subscribe again with afterEventId set \
         to the last eventId received",
    )
    .extend_with(|_, ext| {
        if let Some(id) = last_id {
            ext.set("lastEventId", id);
        }
    })
}

/// Request data: whether an execution is a client's subscription to count;
/// `false` for one shared by several ([`super::shared`]), whose subscribers
/// count instead.
pub struct Counted(pub bool);

/// Events of one type from the event log, decoded with their ids, until
/// shutdown (which completes the subscription): those after `after` first
/// (from the database), then live. A subscriber that falls behind gets one
/// error naming the last event id it was sent, and the subscription ends; it
/// resumes by subscribing again after that id.
fn events<T: serde::de::DeserializeOwned + Clone + Send + Sync + 'static>(
    ctx: &Context<'_>,
    kind: &str,
    after: Option<i64>,
) -> Result<impl Stream<Item = Result<(i64, T)>> + Send + 'static> {
    let domain = ctx.data::<Domain>()?;
    let shutdown = ctx.data::<CancellationToken>()?.clone();
    let open = ctx
        .data_opt::<Counted>()
        .is_none_or(|c| c.0)
        .then(|| ctx.data::<Arc<Stats>>().map(|s| Open::new(s.clone())))
        .transpose()?;
    if after.is_some_and(|a| a < 0) {
        return Err(coded(
            "BAD_USER_INPUT",
            "afterEventId: Input should be greater than or equal to 0",
        ));
    }
    let events = domain.events().subscribe(after, EventFilter::parse(kind));
    Ok(events
        .take_until(shutdown.cancelled_owned())
        .scan(false, |ended, item| {
            let out = if *ended {
                None
            } else {
                match item {
                    Item::Event(e) => Some(
                        e.payload_shared::<T>()
                            .map(|t| (e.id, t))
                            .ok_or_else(|| coded("INTERNAL_SERVER_ERROR", "Unreadable event")),
                    ),
                    Item::Reset => Some(Err(coded(
                        "RESET",
                        "History was truncated: the events after afterEventId that are \
                         no longer kept were skipped",
                    ))),
                    Item::CutOff { last_id } => {
                        *ended = true;
                        Some(Err(too_slow(last_id)))
                    }
                }
            };
            futures::future::ready(out)
        })
        .map(move |x| {
            let _keep = &open;
            x
        }))
}

#[Subscription]
impl Subscription {
    /// Every message sent (through any protocol), optionally only one user's.
    /// With `afterEventId`, first every such message announced after that
    /// event (a reconnecting client's last `eventId`), then live.
    async fn message_added(
        &self,
        ctx: &Context<'_>,
        user_id: Option<i32>,
        after_event_id: Option<i64>,
    ) -> Result<impl Stream<Item = Result<Message>>> {
        let want = user_id.map(i64::from);
        Ok(
            events::<domain::Message>(ctx, "message.sent", after_event_id)?.filter_map(move |m| {
                futures::future::ready(match m {
                    Ok((_, m)) if want.is_some_and(|u| u != m.user_id) => None,
                    Ok((id, m)) => Some(Ok(Message(m, Some(id)))),
                    Err(e) => Some(Err(e)),
                })
            }),
        )
    }

    /// Every post created, optionally only one author's. With
    /// `afterEventId`, first every such post announced after that event (a
    /// reconnecting client's last `eventId`), then live.
    async fn post_created(
        &self,
        ctx: &Context<'_>,
        author_id: Option<i32>,
        after_event_id: Option<i64>,
    ) -> Result<impl Stream<Item = Result<Post>>> {
        let want = author_id.map(i64::from);
        Ok(
            events::<domain::Post>(ctx, "post.created", after_event_id)?.filter_map(move |p| {
                futures::future::ready(match p {
                    Ok((_, p)) if want.is_some_and(|a| a != p.author_id) => None,
                    Ok((id, p)) => Some(Ok(Post(p, Some(id)))),
                    Err(e) => Some(Err(e)),
                })
            }),
        )
    }
}
