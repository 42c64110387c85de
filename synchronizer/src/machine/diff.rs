//! Structural diff of two documents, for a sync point "diffed against now":
//! objects are compared key by key, anything else is compared whole (as in
//! the merge, arrays are leaves).

use common::msg::{DiffEntry, DiffOp};
use serde_json::Value;

use super::pointer;

/// Changes from `before` to `after`, in document order (`None` = no document).
pub fn diff(before: Option<&Value>, after: Option<&Value>) -> Vec<DiffEntry> {
    let mut out = Vec::new();
    walk(before, after, "", &mut out);
    out
}

fn walk(before: Option<&Value>, after: Option<&Value>, at: &str, out: &mut Vec<DiffEntry>) {
    if before == after {
        return;
    }
    if let (Some(Value::Object(b)), Some(Value::Object(a))) = (before, after) {
        let mut keys: Vec<&String> = b.keys().chain(a.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            walk(b.get(k), a.get(k), &pointer::push(at, k), out);
        }
        return;
    }
    let op = match (before, after) {
        (None, _) => DiffOp::Added,
        (_, None) => DiffOp::Removed,
        _ => DiffOp::Changed,
    };
    out.push(DiffEntry {
        pointer: at.to_owned(),
        op,
        before: before.cloned(),
        after: after.cloned(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_added_removed_and_changed_leaves() {
        let d = diff(
            Some(&json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1]})),
            Some(&json!({"a": 1, "b": {"c": 4}, "l": [1, 2], "n": null})),
        );
        let ops: Vec<(&str, DiffOp)> = d.iter().map(|e| (e.pointer.as_str(), e.op)).collect();
        assert_eq!(
            ops,
            vec![
                ("/b/c", DiffOp::Changed),
                ("/b/d", DiffOp::Removed),
                ("/l", DiffOp::Changed),
                ("/n", DiffOp::Added),
            ]
        );
        assert!(diff(Some(&json!({"x": 1})), Some(&json!({"x": 1}))).is_empty());
        assert_eq!(diff(Some(&json!(1)), None)[0].op, DiffOp::Removed);
    }
}
