//! What every one of prism's OpenAPI documents says the same way, added to
//! each once it is assembled rather than repeated on every handler: the
//! bearer scheme, the 401 of an operation that needs a token, the 422 of one
//! that reads input (FastAPI documents both on every route), and the field
//! limits of SPEC §2. The limits are read from the constants the validators
//! apply, so a generated client checks what the server checks and the
//! document cannot drift from the rules.

use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        Components, OpenApi, Ref, RefOr, ResponseBuilder,
        content::ContentBuilder,
        path::{Operation, Parameter},
        schema::{
            AdditionalProperties, ArrayBuilder, ArrayItems, KnownFormat, ObjectBuilder, Schema,
            SchemaFormat, SchemaType, Type,
        },
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use super::Detail;
use crate::domain::validate::limits;

/// A 422 body: `{"detail": [{"loc": ["body", "email"], "msg": "…", "type": "…"}]}`.
#[derive(Debug)]
pub struct ValidationDetail;

impl PartialSchema for ValidationDetail {
    fn schema() -> RefOr<Schema> {
        let string = || ObjectBuilder::new().schema_type(Type::String);
        let error = ObjectBuilder::new()
            .property(
                "loc",
                ArrayBuilder::new()
                    .items(
                        ObjectBuilder::new()
                            .schema_type(SchemaType::Array(vec![Type::String, Type::Integer])),
                    )
                    .description(Some(
                        "Where: `body`, `query` or `path`, then the field (a position in \
                         the body for JSON that does not parse)",
                    )),
            )
            .required("loc")
            .property("msg", string())
            .required("msg")
            .property(
                "type",
                string().description(Some("e.g. `missing`, `string_too_short`")),
            )
            .required("type");
        ObjectBuilder::new()
            .property("detail", ArrayBuilder::new().items(error))
            .required("detail")
            .into()
    }
}

impl ToSchema for ValidationDetail {}

/// Completes a document: see the module's documentation.
pub fn finish(mut doc: OpenApi) -> OpenApi {
    let components = doc.components.get_or_insert_with(Components::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .build(),
        ),
    );
    for (name, schema) in [
        (Detail::name(), Detail::schema()),
        (ValidationDetail::name(), ValidationDetail::schema()),
    ] {
        components
            .schemas
            .entry(name.into_owned())
            .or_insert(schema);
    }
    for (name, field, rule) in FIELD_RULES {
        let found = components
            .schemas
            .get_mut(*name)
            .and_then(|s| property(s, field))
            .map(|p| rule.apply(p))
            .is_some();
        // A schema not in this document is fine (each sub-app has a few);
        // a field missing from one that is there is a stale rule.
        debug_assert!(
            found || !components.schemas.contains_key(*name),
            "no field {name}.{field} to document"
        );
    }
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in operations.into_iter().flatten() {
            common_answers(op);
        }
    }
    doc
}

fn common_answers(op: &mut Operation) {
    let needs_token = op.security.as_ref().is_some_and(|s| !s.is_empty());
    let reads_input =
        op.request_body.is_some() || op.parameters.as_ref().is_some_and(|p| !p.is_empty());
    let answers = &mut op.responses.responses;
    if needs_token {
        answers
            .entry("401".into())
            .or_insert_with(|| answer("Missing, malformed or expired bearer token", "Detail"));
    }
    if reads_input {
        answers
            .entry("422".into())
            .or_insert_with(|| answer("Validation Error", "ValidationDetail"));
    }
    // OpenAPI 3.1 requires a description on every answer (3.2 does not, so
    // utoipa leaves an unset one out); these are FastAPI's words for them.
    for (status, answer) in answers.iter_mut() {
        if let RefOr::T(a) = answer
            && a.description.is_empty()
        {
            a.description = describe(status).into();
        }
    }
    for p in op.parameters.iter_mut().flatten() {
        if let RefOr::T(p) = p {
            parameter_limits(p);
        }
    }
}

fn describe(status: &str) -> &'static str {
    let code = status
        .parse()
        .ok()
        .and_then(|s| axum::http::StatusCode::from_u16(s).ok());
    match code {
        Some(c) if c.is_success() => "Successful Response",
        Some(c) => c.canonical_reason().unwrap_or("Error"),
        None => "Response",
    }
}

fn answer(description: &str, schema: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(schema)))
                .build(),
        )
        .build()
        .into()
}

/// `limit` and `offset` mean the same on every list (SPEC §2).
fn parameter_limits(p: &mut Parameter) {
    let Some(RefOr::T(Schema::Object(o))) = p.schema.as_mut() else {
        return;
    };
    match p.name.as_str() {
        "limit" | "offset" => o.minimum = Some(0.into()),
        _ => {}
    }
}

/// A property of an object schema, or `None` when `schema` is something else.
fn property<'a>(schema: &'a mut RefOr<Schema>, field: &str) -> Option<&'a mut Schema> {
    let RefOr::T(Schema::Object(o)) = schema else {
        return None;
    };
    match o.properties.get_mut(field)? {
        RefOr::T(s) => Some(s),
        RefOr::Ref(_) => None,
    }
}

enum Rule {
    /// Characters, inclusive.
    Length((usize, usize)),
    Range((i64, i64)),
    NonNegative,
    Email,
    Username,
    /// Three capital letters (ISO 4217's shape), as `Check::currency` asks.
    Currency,
    /// At most this many items, each of this length.
    Items(usize, (usize, usize)),
    /// At most this many entries, keys and values of these lengths.
    Entries(usize, (usize, usize), (usize, usize)),
}

impl Rule {
    fn apply(&self, schema: &mut Schema) {
        match (self, schema) {
            (Rule::Items(max, len), Schema::Array(a)) => {
                a.max_items = Some(*max);
                if let ArrayItems::RefOrSchema(item) = &mut a.items
                    && let RefOr::T(item) = item.as_mut()
                {
                    Rule::Length(*len).apply(item);
                }
            }
            (rule, Schema::Object(o)) => match rule {
                Rule::Length((min, max)) => {
                    o.min_length = Some(*min);
                    o.max_length = Some(*max);
                }
                Rule::Range((min, max)) => {
                    o.minimum = Some((*min as isize).into());
                    o.maximum = Some((*max as isize).into());
                }
                Rule::NonNegative => o.minimum = Some(0.into()),
                Rule::Email => o.format = Some(SchemaFormat::KnownFormat(KnownFormat::Email)),
                Rule::Username => {
                    // The characters `Check::username` allows.
                    let (min, max) = limits::USERNAME;
                    o.pattern = Some(format!("^[A-Za-z0-9_.-]{{{min},{max}}}$"));
                }
                Rule::Currency => o.pattern = Some("^[A-Z]{3}$".to_owned()),
                Rule::Entries(max, key, value) => {
                    o.max_properties = Some(*max);
                    if let Some(names) = o.property_names.as_deref_mut() {
                        Rule::Length(*key).apply(names);
                    }
                    if let Some(values) = o.additional_properties.as_deref_mut()
                        && let AdditionalProperties::RefOr(RefOr::T(values)) = values
                    {
                        Rule::Length(*value).apply(values);
                    }
                }
                Rule::Items(..) => {}
            },
            _ => {}
        }
    }
}

/// `(schema, field, rule)`: what the validators of `crate::domain` enforce.
const FIELD_RULES: &[(&str, &str, Rule)] = &[
    ("NewUser", "name", Rule::Length(limits::NAME)),
    ("NewUser", "email", Rule::Email),
    ("NewUser", "age", Rule::Range(limits::AGE)),
    ("Registration", "username", Rule::Username),
    ("Registration", "email", Rule::Email),
    ("Registration", "password", Rule::Length(limits::PASSWORD)),
    ("NewPost", "title", Rule::Length(limits::TITLE)),
    ("NewPost", "content", Rule::Length(limits::CONTENT)),
    ("PostPatch", "title", Rule::Length(limits::TITLE)),
    ("PostPatch", "content", Rule::Length(limits::CONTENT)),
    ("NewComment", "content", Rule::Length(limits::CONTENT)),
    ("NewMessage", "content", Rule::Length(limits::CONTENT)),
    ("NewOrder", "total", Rule::NonNegative),
    ("NewProduct", "name", Rule::Length(limits::NAME)),
    (
        "NewProduct",
        "description",
        Rule::Length(limits::DESCRIPTION),
    ),
    (
        "NewProduct",
        "tags",
        Rule::Items(limits::MAX_TAGS, limits::TAG),
    ),
    (
        "NewProduct",
        "metadata",
        Rule::Entries(
            limits::MAX_METADATA,
            limits::METADATA_KEY,
            limits::METADATA_VALUE,
        ),
    ),
    ("Price", "amount", Rule::NonNegative),
    ("Price", "currency", Rule::Currency),
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn served() -> Vec<Value> {
        crate::http::documents()
            .into_iter()
            .map(|(_, doc)| serde_json::to_value(doc).unwrap())
            .collect()
    }

    #[test]
    fn every_rule_reaches_a_served_document() {
        let docs = served();
        for (name, field, _) in FIELD_RULES {
            let fields: Vec<&Value> = docs
                .iter()
                .filter_map(|d| d["components"]["schemas"][name]["properties"].get(field))
                .collect();
            assert!(!fields.is_empty(), "{name}.{field} is in no document");
            for f in fields {
                let constrained = [
                    "minLength",
                    "minimum",
                    "format",
                    "pattern",
                    "maxItems",
                    "maxProperties",
                ]
                .iter()
                .any(|k| f.get(k).is_some());
                assert!(constrained, "{name}.{field}: {f}");
            }
        }
    }

    #[test]
    fn limits_are_the_validators_own() {
        let docs = served();
        let main = &docs[0]["components"]["schemas"];
        let products = &docs[2]["components"]["schemas"];
        assert_eq!(
            main["NewPost"]["properties"]["title"]["maxLength"],
            json!(limits::TITLE.1)
        );
        assert_eq!(
            main["Registration"]["properties"]["username"]["pattern"],
            "^[A-Za-z0-9_.-]{3,50}$"
        );
        assert_eq!(
            main["Registration"]["properties"]["password"]["minLength"],
            json!(limits::PASSWORD.0)
        );
        let tags = &products["NewProduct"]["properties"]["tags"];
        assert_eq!(tags["maxItems"], json!(limits::MAX_TAGS));
        assert_eq!(tags["items"]["maxLength"], json!(limits::TAG.1));
        let metadata = &products["NewProduct"]["properties"]["metadata"];
        assert_eq!(
            metadata["propertyNames"]["maxLength"],
            json!(limits::METADATA_KEY.1)
        );
        assert_eq!(
            metadata["additionalProperties"]["maxLength"],
            json!(limits::METADATA_VALUE.1)
        );
        assert_eq!(
            products["Price"]["properties"]["currency"]["pattern"],
            "^[A-Z]{3}$"
        );
        let age = &docs[1]["components"]["schemas"]["NewUser"]["properties"]["age"];
        assert_eq!((&age["minimum"], &age["maximum"]), (&json!(0), &json!(150)));
    }

    #[test]
    fn a_422_says_what_prism_sends() {
        let doc = &served()[0];
        let detail = &doc["components"]["schemas"]["ValidationDetail"]["properties"]["detail"];
        assert_eq!(detail["items"]["required"], json!(["loc", "msg", "type"]));
        let list = &doc["paths"]["/posts"]["get"]["parameters"];
        let limit = list
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "limit")
            .unwrap();
        assert_eq!(limit["schema"]["minimum"], 0);
    }
}
