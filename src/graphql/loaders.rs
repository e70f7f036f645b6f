//! DataLoaders for the nested fields (`Post.author`, `Post.comments`,
//! `User.posts`, `User.friends`): one query answers the children of every
//! parent, so a query's statement count does not grow with the number of
//! parents.
//!
//! A DataLoader alone batches by timing: keys that arrive within its delay
//! share a query, and a large list resolved slowly can spill into a second
//! batch, and every batch waits out the delay first. So list resolvers also
//! *prefetch*: they look ahead at the selection and load each selected
//! relation for all parents at once (recursively, one query per relation
//! level) straight into the request's loader caches; the per-item resolvers
//! then find their values cached, and a nested resolver's own prefetch finds
//! its keys done ([`Loaders`] keeps track) and costs nothing.

use std::{
    collections::{HashMap, HashSet},
    sync::OnceLock,
};

use async_graphql::{
    Context, Lookahead, Result,
    dataloader::{DataLoader, HashMapCache, Loader},
};

use super::error::gql_error;
use crate::domain::{Comment, Domain, Post, User};

/// Users by id.
pub struct UserLoader(pub Domain);
/// Posts by author id.
pub struct PostsByAuthor(pub Domain);
/// Comments by post id.
pub struct CommentsByPost(pub Domain);
/// Friends by user id.
pub struct FriendsOf(pub Domain);

impl Loader<i64> for UserLoader {
    type Value = User;
    type Error = async_graphql::Error;

    async fn load(&self, keys: &[i64]) -> Result<HashMap<i64, User>, Self::Error> {
        let users = self.0.users_by_ids(keys).await.map_err(gql_error)?;
        Ok(users.into_iter().map(|u| (u.id, u)).collect())
    }
}

impl Loader<i64> for PostsByAuthor {
    type Value = Vec<Post>;
    type Error = async_graphql::Error;

    async fn load(&self, keys: &[i64]) -> Result<HashMap<i64, Vec<Post>>, Self::Error> {
        let posts = self.0.posts_by_authors(keys).await.map_err(gql_error)?;
        Ok(group(keys, posts, |p| p.author_id))
    }
}

impl Loader<i64> for CommentsByPost {
    type Value = Vec<Comment>;
    type Error = async_graphql::Error;

    async fn load(&self, keys: &[i64]) -> Result<HashMap<i64, Vec<Comment>>, Self::Error> {
        let comments = self.0.comments_by_posts(keys).await.map_err(gql_error)?;
        Ok(group(keys, comments, |c| c.post_id))
    }
}

impl Loader<i64> for FriendsOf {
    type Value = Vec<User>;
    type Error = async_graphql::Error;

    async fn load(&self, keys: &[i64]) -> Result<HashMap<i64, Vec<User>>, Self::Error> {
        let pairs = self.0.friends_by_users(keys).await.map_err(gql_error)?;
        let mut map: HashMap<i64, Vec<User>> = keys.iter().map(|k| (*k, Vec::new())).collect();
        for (user_id, friend) in pairs {
            map.entry(user_id).or_default().push(friend);
        }
        Ok(map)
    }
}

/// Groups children by parent, giving every asked-for parent an entry (an empty
/// list is an answer too, not a miss).
fn group<T>(keys: &[i64], items: Vec<T>, parent: impl Fn(&T) -> i64) -> HashMap<i64, Vec<T>> {
    let mut map: HashMap<i64, Vec<T>> = keys.iter().map(|k| (*k, Vec::new())).collect();
    for item in items {
        map.entry(parent(&item)).or_default().push(item);
    }
    map
}

/// A loader with a per-request cache.
pub type Cached<T> = DataLoader<T, HashMapCache>;

/// The loaders of one HTTP request (`cache`: each caches for the request) or
/// of one WebSocket connection (no cache: the connection's loaders serve
/// every operation and event on it, and a cache would serve later events
/// stale rows). Either way the caller gets loaders of its own, so batches
/// never mix callers. Each loader is made when first used: most operations
/// use one or none, and making and dropping all four for every request was
/// about 4% of the instructions of `{ user(id: 1) { id name email } }`.
pub struct Loaders {
    domain: Domain,
    cache: bool,
    users: OnceLock<Cached<UserLoader>>,
    posts_by_author: OnceLock<Cached<PostsByAuthor>>,
    comments_by_post: OnceLock<Cached<CommentsByPost>>,
    friends_of: OnceLock<Cached<FriendsOf>>,
    /// Keys each relation has already been prefetched for, so a nested
    /// resolver's prefetch skips what an outer one loaded.
    prefetched: parking_lot::Mutex<HashMap<&'static str, HashSet<i64>>>,
}

/// A loader that [`Loaders`] makes on first use.
pub trait Relation: Loader<i64, Error = async_graphql::Error> + Sized {
    fn slot(loaders: &Loaders) -> &OnceLock<Cached<Self>>;
    fn over(domain: Domain) -> Self;
}

macro_rules! relation {
    ($loader:ident, $slot:ident) => {
        impl Relation for $loader {
            fn slot(loaders: &Loaders) -> &OnceLock<Cached<Self>> {
                &loaders.$slot
            }
            fn over(domain: Domain) -> Self {
                $loader(domain)
            }
        }
    };
}
relation!(UserLoader, users);
relation!(PostsByAuthor, posts_by_author);
relation!(CommentsByPost, comments_by_post);
relation!(FriendsOf, friends_of);

impl Loaders {
    pub fn new(domain: Domain, cache: bool) -> Self {
        Loaders {
            domain,
            cache,
            users: OnceLock::new(),
            posts_by_author: OnceLock::new(),
            comments_by_post: OnceLock::new(),
            friends_of: OnceLock::new(),
            prefetched: parking_lot::Mutex::default(),
        }
    }

    pub fn get<T: Relation>(&self) -> &Cached<T> {
        T::slot(self).get_or_init(|| {
            let loader = DataLoader::with_cache(
                T::over(self.domain.clone()),
                tokio::spawn,
                HashMapCache::default(),
            );
            loader.enable_all_cache(self.cache);
            loader
        })
    }

    /// The keys of `ids` not yet prefetched for `relation`, marking them now.
    /// None without a cache: there is nowhere to put what a prefetch loads.
    fn claim(&self, relation: &'static str, ids: &[i64]) -> Vec<i64> {
        if !self.cache {
            return Vec::new();
        }
        let mut seen = self.prefetched.lock();
        let done = seen.entry(relation).or_default();
        ids.iter().copied().filter(|id| done.insert(*id)).collect()
    }
}

/// The request's loader of `T`.
pub fn loader<'a, T: Relation>(ctx: &Context<'a>) -> Result<&'a Cached<T>> {
    Ok(ctx.data::<Loaders>()?.get::<T>())
}

/// Calls the loader directly for the keys not prefetched yet and feeds its
/// answers into the request's cache. Direct, because a DataLoader's own
/// batching waits out its delay first; these keys are already a full batch.
async fn prefetch<T: Relation>(
    ctx: &Context<'_>,
    relation: &'static str,
    ids: &[i64],
) -> Result<HashMap<i64, T::Value>> {
    let loaders = ctx.data::<Loaders>()?;
    let missing = loaders.claim(relation, ids);
    if missing.is_empty() {
        return Ok(HashMap::new());
    }
    let loader = loaders.get::<T>();
    let values = loader.loader().load(&missing).await?;
    loader.feed_many(values.clone()).await;
    Ok(values)
}

/// Loads and caches what `look` selects below these users.
pub async fn prefetch_users(ctx: &Context<'_>, look: &Lookahead<'_>, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let posts = look.field("posts");
    if posts.exists() {
        let by_author = prefetch::<PostsByAuthor>(ctx, "posts_by_author", ids).await?;
        let all: Vec<Post> = by_author.into_values().flatten().collect();
        Box::pin(prefetch_posts(ctx, &posts, &all)).await?;
    }
    let friends = look.field("friends");
    if friends.exists() {
        let by_user = prefetch::<FriendsOf>(ctx, "friends_of", ids).await?;
        let mut friend_ids: Vec<i64> = by_user.values().flatten().map(|u| u.id).collect();
        friend_ids.sort_unstable();
        friend_ids.dedup();
        Box::pin(prefetch_users(ctx, &friends, &friend_ids)).await?;
    }
    Ok(())
}

/// Loads and caches what `look` selects below these posts.
pub async fn prefetch_posts(ctx: &Context<'_>, look: &Lookahead<'_>, posts: &[Post]) -> Result<()> {
    if posts.is_empty() {
        return Ok(());
    }
    let author = look.field("author");
    if author.exists() {
        let mut ids: Vec<i64> = posts.iter().map(|p| p.author_id).collect();
        ids.sort_unstable();
        ids.dedup();
        prefetch::<UserLoader>(ctx, "user", &ids).await?;
        Box::pin(prefetch_users(ctx, &author, &ids)).await?;
    }
    if look.field("comments").exists() {
        let ids: Vec<i64> = posts.iter().map(|p| p.id).collect();
        prefetch::<CommentsByPost>(ctx, "comments_by_post", &ids).await?;
    }
    Ok(())
}
