//! Agreement on shared keys for `synchronize`: where the agents' documents
//! differ at a shared pointer, pick the value every agent will hold.
//!
//! `lww` takes the value of the agent whose document was written last (by
//! hybrid logical clock); `merge` takes the value most agents already hold
//! (ties to the later writer), which disturbs the fewest agents; `reject`
//! agrees nothing and reports the divergence.

use std::collections::BTreeMap;

use common::msg::{ConflictPolicy, Divergence, Hlc};
use common::AgentId;
use serde_json::Value;

/// One agent's document as read for a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub doc: Value,
    pub hlc: Option<Hlc>,
}

/// The divergences found at `pointers`, each with the value chosen by
/// `policy`. Under `reject` the divergences come back as `Err`.
pub fn agree(
    policy: ConflictPolicy,
    pointers: &[String],
    docs: &BTreeMap<AgentId, Held>,
) -> Result<Vec<Divergence>, Vec<Divergence>> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for p in pointers {
        if !seen.insert(p) {
            continue;
        }
        let values: BTreeMap<&AgentId, Option<&Value>> =
            docs.iter().map(|(a, h)| (a, h.doc.pointer(p))).collect();
        let mut distinct = values.values().collect::<Vec<_>>();
        distinct.dedup();
        if values
            .values()
            .all(|v| Some(v) == distinct.first().copied())
        {
            continue;
        }
        let present = || {
            docs.iter()
                .filter_map(|(a, h)| h.doc.pointer(p).map(|v| (a, h, v)))
        };
        let later = |x: &&Held, y: &&Held| x.hlc.cmp(&y.hlc);
        let chosen: Option<(&AgentId, &Value)> = match policy {
            ConflictPolicy::Reject => None,
            ConflictPolicy::Lww => present()
                .max_by(|x, y| later(&x.1, &y.1))
                .map(|(a, _, v)| (a, v)),
            ConflictPolicy::Merge => {
                let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                for (_, _, v) in present() {
                    *counts.entry(v.to_string()).or_default() += 1;
                }
                present()
                    .max_by(|x, y| {
                        let cx = counts.get(&x.2.to_string()).copied().unwrap_or(0);
                        let cy = counts.get(&y.2.to_string()).copied().unwrap_or(0);
                        cx.cmp(&cy).then_with(|| later(&x.1, &y.1))
                    })
                    .map(|(a, _, v)| (a, v))
            }
        };
        out.push(Divergence {
            pointer: p.clone(),
            values: values
                .iter()
                .map(|(a, v)| ((*a).clone(), v.cloned().unwrap_or(Value::Null)))
                .collect(),
            agreed: chosen.map_or(Value::Null, |(_, v)| v.clone()),
            from: chosen.map(|(a, _)| a.clone()),
        });
    }
    if policy == ConflictPolicy::Reject && !out.is_empty() {
        return Err(out);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn held(doc: Value, p: u64) -> Held {
        Held {
            doc,
            hlc: Some(Hlc {
                physical_ms: p,
                logical: 0,
                node: "n".into(),
            }),
        }
    }

    #[test]
    fn policies_pick_the_agreed_value() {
        let a = |s: &str| AgentId::new(s).unwrap();
        let docs: BTreeMap<AgentId, Held> = [
            (a("a1"), held(json!({"plan": 1, "same": 0}), 10)),
            (a("a2"), held(json!({"plan": 1, "same": 0}), 11)),
            (a("a3"), held(json!({"plan": 2, "same": 0}), 30)),
            (a("a4"), held(json!({"same": 0}), 40)),
        ]
        .into();
        let ptrs = vec!["/plan".to_owned(), "/same".to_owned(), "/plan".to_owned()];
        let lww = agree(ConflictPolicy::Lww, &ptrs, &docs).unwrap();
        assert_eq!(lww.len(), 1);
        assert_eq!(
            (lww[0].agreed.clone(), lww[0].from.clone()),
            (json!(2), Some(a("a3")))
        );
        assert_eq!(lww[0].values[&a("a4")], Value::Null);
        let merge = agree(ConflictPolicy::Merge, &ptrs, &docs).unwrap();
        assert_eq!(
            (merge[0].agreed.clone(), merge[0].from.clone()),
            (json!(1), Some(a("a2")))
        );
        let rejected = agree(ConflictPolicy::Reject, &ptrs, &docs).unwrap_err();
        assert_eq!(rejected[0].pointer, "/plan");
    }
}
