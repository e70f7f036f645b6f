//! Parsed query documents, and what a repeated request may skip.
//!
//! async-graphql's full validation (`ValidationMode::Strict`) was 31% of the
//! cost of `{ user(id: 1) { id name email } }` and over a third of the same
//! query sent with its id as a variable. Its rules look only at the document
//! and the schema, except one: `ArgumentsOfCorrectType` checks each argument
//! with the request's variables put in. So an operation that passed every
//! rule once passes them again, unchanged, unless its variables now hold
//! something that rule refuses. A repeated request runs on the schema with
//! `ValidationMode::Fast` (the depth and complexity limits, fragment cycles)
//! only when [`Documents::parse`] and [`plainly_valid`] together show that
//! the full rules would find nothing; anything less certain runs them all,
//! so every answer is the one full validation gives.

use std::collections::HashMap;

use async_graphql::{
    Name, Positioned,
    parser::types::{
        BaseType, Directive, ExecutableDocument, OperationDefinition, Selection, SelectionSet, Type,
    },
};
use async_graphql_value::Value as GqlValue;
use parking_lot::RwLock;
use serde_json::{Map, Value};

/// Parsed query documents by query text. Clients send the same few queries
/// over and over, and parsing is the largest single cost of a small query;
/// a parsed document is cloned per request instead. When full the cache
/// starts over, so unique queries cannot grow it without bound.
#[derive(Default)]
pub(super) struct Documents(RwLock<HashMap<Box<str>, Parsed>>);

struct Parsed {
    doc: ExecutableDocument,
    /// The operations (by the name the request gave, if any) that passed
    /// every validation rule once.
    valid: Vec<Option<Box<str>>>,
    variables_alone: bool,
}

const DOCUMENT_CACHE: usize = 512;

/// A document from the cache, and what is known of the operation asked for.
pub(super) struct Found {
    pub doc: ExecutableDocument,
    /// The operation passed every validation rule in an earlier request.
    pub valid: bool,
    /// Every variable in the document is an argument's whole value, never
    /// part of a list or object literal.
    pub variables_alone: bool,
}

impl Documents {
    pub fn parse(
        &self,
        query: &str,
        operation: Option<&str>,
    ) -> Result<Found, async_graphql::parser::Error> {
        if let Some(p) = self.0.read().get(query) {
            return Ok(Found {
                doc: p.doc.clone(),
                valid: p.valid.iter().any(|v| v.as_deref() == operation),
                variables_alone: p.variables_alone,
            });
        }
        let doc = async_graphql::parser::parse_query(query)?;
        let variables_alone = variables_alone(&doc);
        let mut map = self.0.write();
        if map.len() >= DOCUMENT_CACHE {
            map.clear();
        }
        let parsed = Parsed {
            doc: doc.clone(),
            valid: Vec::new(),
            variables_alone,
        };
        map.insert(query.into(), parsed);
        Ok(Found {
            doc,
            valid: false,
            variables_alone,
        })
    }

    /// Remembers that `operation` of `query` passed every validation rule.
    /// An operation name the document does not have never gets here: it is
    /// refused after validation, and the request fails.
    pub fn found_valid(&self, query: &str, operation: Option<&str>) {
        if let Some(p) = self.0.write().get_mut(query)
            && !p.valid.iter().any(|v| v.as_deref() == operation)
        {
            p.valid.push(operation.map(Into::into));
        }
    }
}

/// Whether a request may skip the rules that `found` passed once.
///
/// Without variables the rules see what they saw before (fewer variables
/// only means fewer arguments checked). With variables, an argument that is
/// a variable alone was checked before only if that variable was given, so
/// every value given now must be [`plainly_valid`]; an argument with a
/// variable inside a literal was checked, literal and all, only when every
/// variable in it was given, so such a document always runs every rule.
pub(super) fn may_skip_rules(found: &Found, variables: Option<&Map<String, Value>>) -> bool {
    found.valid
        && match variables {
            None => true,
            Some(v) if v.is_empty() => true,
            Some(v) => found.variables_alone && plainly_valid(&found.doc, v),
        }
}

/// Every given variable is plainly of the type each operation of `doc`
/// declares for it: a subset of what `ArgumentsOfCorrectType` accepts for
/// any argument such a variable may stand in (the other rules have made sure
/// the two types agree). Values that rule may judge otherwise than the
/// declared type suggests answer `false`:
///
/// - `null`: a nullable variable with a default may fill a non-null argument;
/// - integers outside `0..=i32::MAX`: async-graphql registers several Rust
///   integer types as `Int`, some of which check for unsigned values;
/// - enums, input objects and custom scalars, whose checks live in the schema;
/// - a single value for a list type, which GraphQL coerces to a list.
///
/// Variables the document does not declare are not read by any rule.
fn plainly_valid(doc: &ExecutableDocument, given: &Map<String, Value>) -> bool {
    doc.operations.iter().all(|(_, op)| {
        op.node.variable_definitions.iter().all(|def| {
            given
                .get(def.node.name.node.as_str())
                .is_none_or(|value| plainly_of(&def.node.var_type.node, value))
        })
    })
}

fn plainly_of(ty: &Type, value: &Value) -> bool {
    match (&ty.base, value) {
        (_, Value::Null) => false,
        (BaseType::List(item), Value::Array(items)) => items.iter().all(|v| plainly_of(item, v)),
        (BaseType::List(_), _) => false,
        (BaseType::Named(name), value) => match (name.as_str(), value) {
            ("Int", Value::Number(n)) => n.as_u64().is_some_and(|n| n <= i32::MAX as u64),
            ("Float", Value::Number(_)) => true,
            ("String" | "ID", Value::String(_)) => true,
            ("Boolean", Value::Bool(_)) => true,
            _ => false,
        },
    }
}

/// Whether no variable in `doc` sits inside a list or object literal.
fn variables_alone(doc: &ExecutableDocument) -> bool {
    fn contains_variable(v: &GqlValue) -> bool {
        match v {
            GqlValue::Variable(_) => true,
            GqlValue::List(items) => items.iter().any(contains_variable),
            GqlValue::Object(fields) => fields.values().any(contains_variable),
            _ => false,
        }
    }
    fn arguments_alone(arguments: &[(Positioned<Name>, Positioned<GqlValue>)]) -> bool {
        arguments.iter().all(|(_, v)| match &v.node {
            GqlValue::Variable(_) => true,
            other => !contains_variable(other),
        })
    }
    fn directives_alone(directives: &[Positioned<Directive>]) -> bool {
        directives
            .iter()
            .all(|d| arguments_alone(&d.node.arguments))
    }
    fn set_alone(set: &SelectionSet) -> bool {
        set.items.iter().all(|s| match &s.node {
            Selection::Field(f) => {
                arguments_alone(&f.node.arguments)
                    && directives_alone(&f.node.directives)
                    && set_alone(&f.node.selection_set.node)
            }
            Selection::FragmentSpread(s) => directives_alone(&s.node.directives),
            Selection::InlineFragment(f) => {
                directives_alone(&f.node.directives) && set_alone(&f.node.selection_set.node)
            }
        })
    }
    let operation_alone = |op: &OperationDefinition| {
        directives_alone(&op.directives) && set_alone(&op.selection_set.node)
    };
    doc.operations
        .iter()
        .all(|(_, op)| operation_alone(&op.node))
        && doc
            .fragments
            .values()
            .all(|f| directives_alone(&f.node.directives) && set_alone(&f.node.selection_set.node))
}

/// A required variable (non-null, no default) of the operation to run that
/// the request does not give. Coercing variables comes before execution
/// (GraphQL's CoerceVariableValues), so this is a request error;
/// async-graphql would only notice in the middle of executing, as an
/// internal error under the field that reads the variable.
pub(super) fn missing_variable(
    doc: &ExecutableDocument,
    operation_name: Option<&str>,
    given: Option<&Map<String, Value>>,
) -> Option<String> {
    let mut selected = doc
        .operations
        .iter()
        .filter(|(name, _)| match operation_name {
            Some(want) => name.is_some_and(|n| n.as_str() == want),
            None => true,
        });
    let (_, op) = selected.next()?;
    if selected.next().is_some() {
        // No single operation: async-graphql says which name is needed.
        return None;
    }
    op.node.variable_definitions.iter().find_map(|v| {
        let v = &v.node;
        let name = v.name.node.as_str();
        let required = !v.var_type.node.nullable && v.default_value.is_none();
        (required && !given.is_some_and(|g| g.contains_key(name))).then(|| {
            format!(
                "Variable \"${name}\" of required type \"{}\" was not provided.",
                v.var_type.node
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(query: &str) -> ExecutableDocument {
        async_graphql::parser::parse_query(query).unwrap()
    }

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn variables_inside_literals_are_found_anywhere() {
        for alone in [
            "query Q($id: Int!) { user(id: $id) { name } }",
            "query Q($f: Boolean!) { user(id: 1) { name @include(if: $f) } }",
            "query Q($f: Boolean!) { ...F } fragment F on Query { user(id: 1) @skip(if: $f) { name } }",
            "{ a(xs: [1, 2], o: {k: \"v\"}) { b } }",
        ] {
            assert!(variables_alone(&doc(alone)), "{alone}");
        }
        for inside in [
            "query Q($id: Int!) { a(ids: [$id]) { b } }",
            "query Q($id: Int!) { a(o: {k: [1, $id]}) { b } }",
            "query Q($id: Int!) { x { ... on T { a(ids: [$id]) { b } } } }",
            "query Q($id: Int!) { ...F } fragment F on Query { a(o: {k: $id}) { b } }",
            "query Q($id: Int!) @d(o: {k: $id}) { a { b } }",
        ] {
            assert!(!variables_alone(&doc(inside)), "{inside}");
        }
    }

    #[test]
    fn only_plainly_typed_values_pass() {
        let d = doc(
            "query Q($i: Int, $s: String!, $b: Boolean, $l: [Int!], $f: Float, $id: ID, \
                     $e: Category) { a }",
        );
        for good in [
            json!({"i": 0}),
            json!({"i": 2147483647, "s": "", "b": false, "f": -1.5, "id": "7"}),
            json!({"l": [], "f": 3}),
            json!({"l": [1, 2]}),
            json!({"undeclared": "anything", "i": 1}),
        ] {
            assert!(plainly_valid(&d, &vars(good.clone())), "{good}");
        }
        for unsure in [
            json!({"i": null}),
            json!({"i": -1}),
            json!({"i": 2147483648_u64}),
            json!({"i": 1.5}),
            json!({"i": "1"}),
            json!({"s": 1}),
            json!({"b": "true"}),
            json!({"l": 1}),
            json!({"l": [1, null]}),
            json!({"f": "1.0"}),
            json!({"id": 7}),
            json!({"e": "BOOKS"}),
        ] {
            assert!(!plainly_valid(&d, &vars(unsure.clone())), "{unsure}");
        }
        // A name declared by two operations must suit both declarations.
        let two = doc("query A($x: Int) { a } query B($x: String) { a }");
        assert!(!plainly_valid(&two, &vars(json!({"x": 1}))));
        assert!(!plainly_valid(&two, &vars(json!({"x": "1"}))));
    }

    #[test]
    fn skipping_needs_an_earlier_pass_and_plain_variables() {
        let found = |valid, query: &str| {
            let doc = doc(query);
            Found {
                variables_alone: variables_alone(&doc),
                doc,
                valid,
            }
        };
        let plain = "query Q($id: Int) { user(id: $id) { name } }";
        let given = vars(json!({"id": 1}));
        assert!(!may_skip_rules(&found(false, plain), None));
        assert!(may_skip_rules(&found(true, plain), None));
        assert!(may_skip_rules(&found(true, plain), Some(&Map::new())));
        assert!(may_skip_rules(&found(true, plain), Some(&given)));
        assert!(!may_skip_rules(
            &found(true, plain),
            Some(&vars(json!({"id": "1"})))
        ));
        let inside = "query Q($id: Int) { a(ids: [$id]) { b } }";
        assert!(may_skip_rules(&found(true, inside), None));
        assert!(!may_skip_rules(&found(true, inside), Some(&given)));
    }
}
