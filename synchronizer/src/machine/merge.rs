//! The three-way JSON merge behind the `merge` conflict policy.
//!
//! Objects merge key by key; everything else (numbers, strings, arrays, null)
//! is a leaf that one side either kept or replaced. A leaf changed on one side
//! only takes that side's value; changed identically on both, that value; changed
//! differently on both, it is a conflict: the preferred side wins and its pointer
//! is listed. Arrays are leaves because positional edits of a list cannot be told
//! apart from rewrites without ids, and guessing would corrupt plans and queues.
//!
//! The base may be unknown (it aged out of the key's history). Then a key held
//! by one side only is kept (it may have been added or deleted; keeping loses
//! nothing), and any leaf the sides disagree on is a conflict.

use serde_json::{Map, Value};

use super::pointer;

/// Which side wins a leaf changed differently on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The incoming write.
    Ours,
    /// The stored document.
    Theirs,
}

/// A merge result.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub value: Value,
    /// Pointers of the leaves changed differently on both sides, in document order.
    pub conflicts: Vec<String>,
}

/// Merges `theirs` (stored) and `ours` (incoming), both made from `base`.
pub fn merge3(base: Option<&Value>, theirs: &Value, ours: &Value, prefer: Side) -> Merged {
    let mut conflicts = Vec::new();
    let value =
        merge_at(base, Some(theirs), Some(ours), prefer, "", &mut conflicts).unwrap_or(Value::Null);
    Merged { value, conflicts }
}

/// `None` means absent (a deleted or never-present key).
fn merge_at(
    base: Option<&Value>,
    theirs: Option<&Value>,
    ours: Option<&Value>,
    prefer: Side,
    at: &str,
    conflicts: &mut Vec<String>,
) -> Option<Value> {
    if theirs == ours {
        return ours.cloned();
    }
    if base.is_some() && base == theirs {
        return ours.cloned();
    }
    if base.is_some() && base == ours {
        return theirs.cloned();
    }
    // Both sides moved away from the base (or there is none to tell).
    if let (Some(Value::Object(t)), Some(Value::Object(o))) = (theirs, ours) {
        let b = match base {
            Some(Value::Object(b)) => Some(b),
            _ => None,
        };
        return Some(Value::Object(merge_objects(b, t, o, prefer, at, conflicts)));
    }
    if base.is_none() {
        // Unknown or absent base: a value on one side only is kept.
        match (theirs, ours) {
            (None, Some(v)) | (Some(v), None) => return Some(v.clone()),
            _ => {}
        }
    }
    conflicts.push(at.to_owned());
    match prefer {
        Side::Ours => ours.cloned(),
        Side::Theirs => theirs.cloned(),
    }
}

fn merge_objects(
    base: Option<&Map<String, Value>>,
    theirs: &Map<String, Value>,
    ours: &Map<String, Value>,
    prefer: Side,
    at: &str,
    conflicts: &mut Vec<String>,
) -> Map<String, Value> {
    // Sorted, de-duplicated keys: the result does not depend on map order.
    let mut keys: Vec<&String> = theirs.keys().chain(ours.keys()).collect();
    if let Some(b) = base {
        keys.extend(b.keys());
    }
    keys.sort();
    keys.dedup();
    let mut out = Map::new();
    for k in keys {
        let here = pointer::push(at, k);
        let merged = merge_at(
            base.and_then(|b| b.get(k)),
            theirs.get(k),
            ours.get(k),
            prefer,
            &here,
            conflicts,
        );
        if let Some(v) = merged {
            out.insert(k.clone(), v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn disjoint_edits_both_survive() {
        let base = json!({"a": 1, "b": {"x": 1, "y": 2}, "gone": true});
        let theirs = json!({"a": 2, "b": {"x": 1, "y": 2}, "gone": true, "t": 1});
        let ours = json!({"a": 1, "b": {"x": 1, "y": 3}, "o": [1]});
        let m = merge3(Some(&base), &theirs, &ours, Side::Ours);
        assert_eq!(
            m.value,
            json!({"a": 2, "b": {"x": 1, "y": 3}, "t": 1, "o": [1]})
        );
        assert!(m.conflicts.is_empty());
    }

    #[test]
    fn leaves_changed_on_both_sides_follow_the_preference_and_are_listed() {
        let base = json!({"plan": {"id": 1, "steps": [1]}, "k/e~y": 0});
        let theirs = json!({"plan": {"id": 2, "steps": [1, 2]}, "k/e~y": 1});
        let ours = json!({"plan": {"id": 3, "steps": [1]}, "k/e~y": 2});
        let m = merge3(Some(&base), &theirs, &ours, Side::Theirs);
        assert_eq!(m.value, theirs);
        assert_eq!(m.conflicts, vec!["/k~1e~0y", "/plan/id"]);
        let m = merge3(Some(&base), &theirs, &ours, Side::Ours);
        assert_eq!(
            m.value,
            json!({"plan": {"id": 3, "steps": [1, 2]}, "k/e~y": 2})
        );
    }

    #[test]
    fn delete_against_edit_is_a_conflict() {
        let base = json!({"a": 1});
        let m = merge3(Some(&base), &json!({}), &json!({"a": 2}), Side::Theirs);
        assert_eq!((m.value, m.conflicts), (json!({}), vec!["/a".to_owned()]));
        // A deletion on one side with no edit on the other is simply applied.
        let m = merge3(
            Some(&base),
            &json!({}),
            &json!({"a": 1, "b": 1}),
            Side::Ours,
        );
        assert_eq!((m.value, m.conflicts.len()), (json!({"b": 1}), 0));
    }

    #[test]
    fn without_a_base_one_sided_keys_are_kept_and_disagreements_listed() {
        let theirs = json!({"a": 1, "same": 5, "t": 1});
        let ours = json!({"a": 2, "same": 5, "o": 1});
        let m = merge3(None, &theirs, &ours, Side::Ours);
        assert_eq!(m.value, json!({"a": 2, "same": 5, "t": 1, "o": 1}));
        assert_eq!(m.conflicts, vec!["/a"]);
    }

    #[test]
    fn a_type_change_on_both_sides_is_one_conflict_at_the_parent() {
        let base = json!({"x": {"a": 1}});
        let m = merge3(
            Some(&base),
            &json!({"x": [1]}),
            &json!({"x": "s"}),
            Side::Ours,
        );
        assert_eq!(
            (m.value, m.conflicts),
            (json!({"x": "s"}), vec!["/x".to_owned()])
        );
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Small documents: objects over a few keys, nested twice, with scalar and array leaves.
    fn doc() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i8>().prop_map(|n| json!(n)),
            "[a-c]{0,2}".prop_map(Value::String),
            Just(Value::Null),
            prop::collection::vec(any::<i8>(), 0..3).prop_map(|v| json!(v)),
        ];
        leaf.prop_recursive(2, 24, 4, |inner| {
            prop::collection::btree_map("[a-e]", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        })
    }

    fn object() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map("[a-h]", doc(), 0..8).prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #[test]
        fn an_unchanged_side_yields_the_other(base in doc(), other in doc()) {
            let m = merge3(Some(&base), &base, &other, Side::Theirs);
            prop_assert_eq!(&m.value, &other);
            prop_assert!(m.conflicts.is_empty());
            let m = merge3(Some(&base), &other, &base, Side::Ours);
            prop_assert_eq!(&m.value, &other);
            prop_assert!(m.conflicts.is_empty());
        }

        #[test]
        fn disjoint_edits_are_both_kept(
            base in object(),
            ours_edits in prop::collection::btree_map("[i-m]", doc(), 0..4),
            theirs_edits in prop::collection::btree_map("[n-r]", doc(), 0..4),
        ) {
            let mut ours = base.clone();
            ours.extend(ours_edits.clone());
            let mut theirs = base.clone();
            theirs.extend(theirs_edits.clone());
            let m = merge3(
                Some(&Value::Object(base)),
                &Value::Object(theirs),
                &Value::Object(ours),
                Side::Ours,
            );
            prop_assert!(m.conflicts.is_empty());
            for (k, v) in ours_edits.iter().chain(theirs_edits.iter()) {
                prop_assert_eq!(m.value.get(k), Some(v));
            }
        }

        #[test]
        fn the_result_is_deterministic_and_symmetric(
            base in doc(), theirs in doc(), ours in doc(), aged in any::<bool>()
        ) {
            let b = (!aged).then_some(&base);
            let one = merge3(b, &theirs, &ours, Side::Ours);
            let two = merge3(b, &theirs, &ours, Side::Ours);
            prop_assert_eq!(&one, &two);
            // Swapping the sides and the preference gives the same document.
            let swapped = merge3(b, &ours, &theirs, Side::Theirs);
            prop_assert_eq!(&one.value, &swapped.value);
            prop_assert_eq!(&one.conflicts, &swapped.conflicts);
        }
    }
}
