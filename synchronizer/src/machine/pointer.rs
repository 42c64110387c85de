//! JSON Pointer helpers (RFC 6901) beyond `Value::pointer`: building pointers
//! while walking a document, checking ones people wrote, and setting a value
//! at a pointer whose parents may not exist yet.

use serde_json::{Map, Value};

/// Appends one reference token to `base`, escaped.
pub fn push(base: &str, token: &str) -> String {
    let mut p = String::with_capacity(base.len() + token.len() + 1);
    p.push_str(base);
    p.push('/');
    for c in token.chars() {
        match c {
            '~' => p.push_str("~0"),
            '/' => p.push_str("~1"),
            c => p.push(c),
        }
    }
    p
}

/// Whether `p` is a well-formed pointer: empty (the whole document) or
/// `/`-separated tokens in which `~` only appears as `~0` or `~1`.
pub fn is_valid(p: &str) -> bool {
    if p.is_empty() {
        return true;
    }
    if !p.starts_with('/') {
        return false;
    }
    let bytes = p.as_bytes();
    bytes
        .iter()
        .enumerate()
        .all(|(i, b)| *b != b'~' || matches!(bytes.get(i + 1), Some(b'0') | Some(b'1')))
}

fn tokens(p: &str) -> impl Iterator<Item = String> + '_ {
    p.split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
}

/// Sets `value` at `p`, creating objects for missing parents and replacing
/// scalars that stand in the way. Array elements are addressed by index; an
/// index past the end appends. Returns false for an invalid pointer.
pub fn set(doc: &mut Value, p: &str, value: Value) -> bool {
    if !is_valid(p) {
        return false;
    }
    if p.is_empty() {
        *doc = value;
        return true;
    }
    let toks: Vec<String> = tokens(p).collect();
    let mut cur = doc;
    for (i, tok) in toks.iter().enumerate() {
        let last = i + 1 == toks.len();
        let index = match &*cur {
            Value::Array(arr) if tok == "-" => Some(arr.len()),
            Value::Array(arr) => tok.parse::<usize>().ok().map(|n| n.min(arr.len())),
            _ => None,
        };
        if let Some(index) = index {
            let Value::Array(arr) = cur else {
                return false;
            };
            if index == arr.len() {
                arr.push(Value::Null);
            }
            if last {
                arr[index] = value;
                return true;
            }
            cur = &mut arr[index];
            continue;
        }
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(map) = cur else {
            return false;
        };
        if last {
            map.insert(tok.clone(), value);
            return true;
        }
        cur = map.entry(tok.clone()).or_insert(Value::Null);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escapes_and_validates() {
        assert_eq!(push("", "a/b~c"), "/a~1b~0c");
        assert!(is_valid(""));
        assert!(is_valid("/a~0/b~1"));
        assert!(!is_valid("a"));
        assert!(!is_valid("/a~2"));
        let doc = json!({"a/b~c": 1});
        assert_eq!(doc.pointer(&push("", "a/b~c")), Some(&json!(1)));
    }

    #[test]
    fn sets_through_missing_parents_and_arrays() {
        let mut doc = json!({"plan": 3, "list": [1, 2]});
        assert!(set(&mut doc, "/plan/id", json!("p1")));
        assert!(set(&mut doc, "/list/1", json!(9)));
        assert!(set(&mut doc, "/list/-", json!(10)));
        assert!(set(&mut doc, "/new/deep/x", json!(true)));
        assert_eq!(
            doc,
            json!({"plan": {"id": "p1"}, "list": [1, 9, 10], "new": {"deep": {"x": true}}})
        );
        assert!(!set(&mut doc, "bad", json!(1)));
        assert!(set(&mut doc, "", json!(1)));
        assert_eq!(doc, json!(1));
    }
}
