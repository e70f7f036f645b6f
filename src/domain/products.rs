//! The product catalogue. Reads are public; every write needs the admin role.

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::ToSchema;

use super::{
    Domain, Page,
    validate::{Check, limits},
};
use crate::{
    auth::Principal,
    db,
    db::inline::FromSqlite,
    error::{Error, FieldError, Result},
    fetch_all, fetch_optional,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Category {
    Electronics,
    Clothing,
    Food,
    Books,
}

impl Category {
    pub const ALL: [Category; 4] = [
        Category::Electronics,
        Category::Clothing,
        Category::Food,
        Category::Books,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Electronics => "ELECTRONICS",
            Category::Clothing => "CLOTHING",
            Category::Food => "FOOD",
            Category::Books => "BOOKS",
        }
    }

    pub fn parse(s: &str) -> Option<Category> {
        Category::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Price {
    pub amount: f64,
    /// Three-letter currency code, e.g. `USD`.
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub price: Price,
    pub category: Category,
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

/// A product as a client submits it (create, or full replacement on update).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NewProduct {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub price: Price,
    pub category: Category,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl Product {
    /// Product `id` as `new` describes it.
    fn from_new(id: i64, new: &NewProduct) -> Product {
        Product {
            id,
            name: new.name.clone(),
            description: new.description.clone(),
            price: new.price.clone(),
            category: new.category,
            tags: new.tags.clone(),
            metadata: new.metadata.clone(),
        }
    }
}

/// A product's columns that are not its fields as they are: its
/// category's name, and its tags and metadata as JSON text.
struct Stored {
    category: &'static str,
    tags: String,
    metadata: String,
}

impl NewProduct {
    /// What it stores that is not one of its fields as it is.
    fn stored(&self) -> Result<Stored> {
        Ok(Stored {
            category: self.category.as_str(),
            tags: serde_json::to_string(&self.tags).map_err(Error::internal)?,
            metadata: serde_json::to_string(&self.metadata).map_err(Error::internal)?,
        })
    }

    /// Its columns' values: name, description, price amount and currency,
    /// category, tags, metadata.
    fn columns<'a>(&'a self, stored: &'a Stored) -> Vec<&'a dyn db::WriteArg<'a>> {
        vec![
            &self.name,
            &self.description,
            &self.price.amount,
            &self.price.currency,
            &stored.category,
            &stored.tags,
            &stored.metadata,
        ]
    }

    fn validate(&self) -> Result<()> {
        let mut c = Check::new();
        c.length("name", &self.name, limits::NAME.0, limits::NAME.1)
            .length(
                "description",
                &self.description,
                limits::DESCRIPTION.0,
                limits::DESCRIPTION.1,
            )
            .non_negative("price.amount", self.price.amount)
            .currency("price.currency", &self.price.currency);
        if self.tags.len() > limits::MAX_TAGS {
            c.push(FieldError::new(
                "tags",
                "too_long",
                format!("At most {} tags", limits::MAX_TAGS),
            ));
        }
        for tag in &self.tags {
            c.length("tags", tag, limits::TAG.0, limits::TAG.1);
        }
        if self.metadata.len() > limits::MAX_METADATA {
            c.push(FieldError::new(
                "metadata",
                "too_long",
                format!("At most {} metadata entries", limits::MAX_METADATA),
            ));
        }
        for (k, v) in &self.metadata {
            c.length(
                "metadata",
                k,
                limits::METADATA_KEY.0,
                limits::METADATA_KEY.1,
            )
            .length(
                "metadata",
                v,
                limits::METADATA_VALUE.0,
                limits::METADATA_VALUE.1,
            );
        }
        c.finish()
    }
}

#[derive(FromRow)]
struct ProductRow {
    id: i64,
    name: String,
    description: String,
    price_amount: f64,
    price_currency: String,
    category: String,
    tags: String,
    metadata: String,
}

impl FromSqlite for ProductRow {
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(ProductRow {
            id: row.get("id")?,
            name: row.get("name")?,
            description: row.get("description")?,
            price_amount: row.get("price_amount")?,
            price_currency: row.get("price_currency")?,
            category: row.get("category")?,
            tags: row.get("tags")?,
            metadata: row.get("metadata")?,
        })
    }
}

impl TryFrom<ProductRow> for Product {
    type Error = Error;
    fn try_from(r: ProductRow) -> Result<Product> {
        Ok(Product {
            id: r.id,
            name: r.name,
            description: r.description,
            price: Price {
                amount: r.price_amount,
                currency: r.price_currency,
            },
            category: Category::parse(&r.category)
                .ok_or_else(|| Error::internal(format!("bad category {:?}", r.category)))?,
            tags: serde_json::from_str(&r.tags).map_err(Error::internal)?,
            metadata: serde_json::from_str(&r.metadata).map_err(Error::internal)?,
        })
    }
}

fn not_found(id: i64) -> Error {
    Error::NotFound(format!("Product {id} not found"))
}

impl Domain {
    /// One page of the catalogue and the number of products matching the filter.
    pub async fn list_products(
        &self,
        category: Option<Category>,
        page: Page,
    ) -> Result<(Vec<Product>, i64)> {
        let cat = category.map(Category::as_str);
        // `$1 IS NULL` keeps one statement for "no filter" and "this category".
        let rows: Vec<ProductRow> = fetch_all!(
            &self.db,
            "SELECT id, name, description, price_amount, price_currency, category, tags, metadata \
             FROM products WHERE ($1 IS NULL OR category = $1) ORDER BY id LIMIT $2 OFFSET $3",
            cat,
            page.limit,
            page.offset,
        );
        let total: Option<(i64,)> = fetch_optional!(
            &self.db,
            "SELECT COUNT(*) FROM products WHERE ($1 IS NULL OR category = $1)",
            cat,
        );
        let total = total.map_or(0, |(n,)| n);
        let products = rows
            .into_iter()
            .map(Product::try_from)
            .collect::<Result<_>>()?;
        Ok((products, total))
    }

    pub async fn get_product(&self, id: i64) -> Result<Arc<Product>> {
        if let Some(p) = self.products_cache.get(id) {
            return Ok(p);
        }
        let generation = self.products_cache.generation();
        let row: Option<ProductRow> = fetch_optional!(
            &self.db,
            "SELECT id, name, description, price_amount, price_currency, category, tags, metadata \
             FROM products WHERE id = $1",
            id,
        );
        let product = Arc::new(Product::try_from(row.ok_or_else(|| not_found(id))?)?);
        self.products_cache.put(id, product.clone(), generation);
        Ok(product)
    }

    pub async fn create_product(&self, by: &Principal, new: NewProduct) -> Result<Product> {
        by.ensure_admin()?;
        new.validate()?;
        let stored = new.stored()?;
        let product = Product::from_new(0, &new);
        self.events
            .insert(
                "INSERT INTO products (name, description, price_amount, price_currency, category, tags, metadata) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &new.columns(&stored),
                "product.created",
                product,
                Error::from,
            )
            .await
    }

    /// Replaces every field of product `id`.
    pub async fn update_product(
        &self,
        by: &Principal,
        id: i64,
        new: NewProduct,
    ) -> Result<Product> {
        by.ensure_admin()?;
        new.validate()?;
        let stored = new.stored()?;
        let mut args = new.columns(&stored);
        args.push(&id);
        // Every column is replaced, so the product as written is known here.
        let product = Product::from_new(id, &new);
        let updated = self
            .events
            .change(
                "UPDATE products SET name = $1, description = $2, price_amount = $3, \
                 price_currency = $4, category = $5, tags = $6, metadata = $7 WHERE id = $8",
                &args,
                "product.updated",
                &product,
                Error::from,
            )
            .await?;
        if updated == 0 {
            return Err(not_found(id));
        }
        // Read-your-writes in this process without waiting for the pump.
        self.products_cache.invalidate(id);
        Ok(product)
    }

    pub async fn delete_product(&self, by: &Principal, id: i64) -> Result<()> {
        by.ensure_admin()?;
        let deleted = self
            .events
            .change(
                "DELETE FROM products WHERE id = $1",
                &[&id],
                "product.deleted",
                &serde_json::json!({"id": id}),
                Error::from,
            )
            .await?;
        if deleted == 0 {
            return Err(not_found(id));
        }
        self.products_cache.invalidate(id);
        Ok(())
    }
}
