//! `--demo`: the rows of SPEC §1, written through the domain (so they get
//! their events like any other write), into an empty database only.

use std::collections::BTreeMap;

use crate::{
    app::Role,
    auth::{self, Principal, random_token},
    domain::{Category, Domain, NewPost, NewProduct, OrderStatus, Price, Registration},
    error::Result,
};

/// Alice's and Bob's demo passwords (the README gives them).
pub const ALICE_PASSWORD: &str = "alice-password";
pub const BOB_PASSWORD: &str = "bob-password";

/// Loads the demo data a role owns, into an empty database: everything for
/// `prism serve`; users and accounts for the users service; the catalogue for
/// the products service; the two orders for the orders service. Returns the
/// admin password when it was generated (so the caller can show it once).
pub async fn load(
    role: Role,
    domain: &Domain,
    admin_password: Option<&str>,
) -> Result<Option<String>> {
    match role {
        Role::Serve | Role::Users => {}
        Role::Products => {
            if domain
                .list_products(None, crate::domain::Page::default())
                .await?
                .1
                == 0
            {
                products(domain).await?;
            }
            return Ok(None);
        }
        Role::Orders => {
            if domain
                .list_orders(None, crate::domain::Page::default())
                .await?
                .is_empty()
            {
                orders(domain).await?;
            }
            return Ok(None);
        }
    }
    if domain.count_users().await? > 0 {
        tracing::info!("database is not empty; demo data not loaded");
        return Ok(None);
    }
    let account = |username: &str, email: &str, password: &str| Registration {
        username: username.into(),
        email: email.into(),
        password: password.into(),
    };
    let alice = domain
        .create_account(
            "Alice",
            Some(30),
            account("alice", "alice@example.com", ALICE_PASSWORD),
            auth::Role::User,
        )
        .await?;
    let bob = domain
        .create_account(
            "Bob",
            Some(25),
            account("bob", "bob@example.com", BOB_PASSWORD),
            auth::Role::User,
        )
        .await?;
    let generated = admin_password.is_none().then(|| random_token(12));
    let password = admin_password.or(generated.as_deref()).unwrap_or_default();
    domain
        .create_account(
            "admin",
            None,
            account("admin", "admin@example.com", password),
            auth::Role::Admin,
        )
        .await?;

    let system = Principal::system();
    domain.add_friend(&system, alice.id, bob.id).await?;
    if role == Role::Users {
        tracing::info!("demo users loaded");
        return Ok(generated);
    }
    for (title, content, author) in [
        ("First Post", "Hello World", alice.id),
        ("Second Post", "GraphQL is great", alice.id),
        ("Bob's Post", "My first post", bob.id),
    ] {
        domain
            .create_post(
                &system,
                NewPost {
                    title: title.into(),
                    content: content.into(),
                    author_id: Some(author),
                },
            )
            .await?;
    }
    for (content, post, user) in [
        ("Nice post!", 1, bob.id),
        ("Thanks, Bob", 1, alice.id),
        ("Agreed, GraphQL is great", 2, bob.id),
        ("Welcome aboard", 3, alice.id),
    ] {
        domain
            .create_comment(&system, post, content, Some(user))
            .await?;
    }
    products(domain).await?;
    orders(domain).await?;
    tracing::info!("demo data loaded");
    Ok(generated)
}

async fn products(domain: &Domain) -> Result<()> {
    let system = Principal::system();
    for (name, description, amount, category, tag, (key, value)) in [
        (
            "Widget",
            "A widget",
            9.99,
            Category::Electronics,
            "tools",
            ("color", "blue"),
        ),
        (
            "Gadget",
            "A gadget",
            19.99,
            Category::Books,
            "fun",
            ("size", "M"),
        ),
    ] {
        domain
            .create_product(
                &system,
                NewProduct {
                    name: name.into(),
                    description: description.into(),
                    price: Price {
                        amount,
                        currency: "USD".into(),
                    },
                    category,
                    tags: vec![tag.into()],
                    metadata: BTreeMap::from([(key.into(), value.into())]),
                },
            )
            .await?;
    }
    Ok(())
}

/// The demo orders, for users 1 (Alice) and 2 (Bob).
async fn orders(domain: &Domain) -> Result<()> {
    domain.insert_order(1, 99.99, OrderStatus::Pending).await?;
    domain
        .insert_order(2, 149.99, OrderStatus::Completed)
        .await?;
    Ok(())
}
