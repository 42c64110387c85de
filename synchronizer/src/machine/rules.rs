//! Consistency validation: each document against the scope's JSON Schema
//! (integrity), and the scope's invariants across agents. Every violation
//! names the agent, the pointer and the rule, so a report can be acted on
//! without re-reading the documents.

use std::collections::{BTreeMap, BTreeSet};

use common::msg::{Invariant, ScopeConfig, Violation};
use common::{AgentId, Error, ErrorCode};
use serde_json::Value;

use super::pointer;

/// A compiled schema.
pub type Schema = jsonschema::Validator;

/// Compiles a scope's schema. `$ref`s to other documents are not fetched, so
/// a schema that needs one is refused here rather than failing later.
pub fn compile_schema(schema: &Value) -> Result<Schema, Error> {
    jsonschema::validator_for(schema).map_err(|e| {
        Error::new(
            ErrorCode::ValidationFailed,
            format!("schema does not compile: {e}"),
        )
        .with_details(serde_json::json!({"problems": [e.to_string()]}))
    })
}

/// Checks a scope configuration before it is stored; lists every problem.
pub fn check_config(cfg: &ScopeConfig) -> Result<(), Error> {
    let mut problems = Vec::new();
    if let Some(schema) = &cfg.schema {
        if let Err(e) = compile_schema(schema) {
            problems.push(e.message);
        }
    }
    let check_pointer = |problems: &mut Vec<String>, p: &str, what: &str| {
        if !pointer::is_valid(p) {
            problems.push(format!(
                "{what}: {p:?} is not a JSON Pointer (it must be empty or start with '/')"
            ));
        }
    };
    for (i, inv) in cfg.invariants.iter().enumerate() {
        match inv {
            Invariant::Agree { pointer, .. } | Invariant::RegisteredAgent { pointer } => {
                check_pointer(&mut problems, pointer, &format!("invariants[{i}]"))
            }
            Invariant::SumAtMost { pointer, max } => {
                check_pointer(&mut problems, pointer, &format!("invariants[{i}]"));
                if !max.is_finite() {
                    problems.push(format!("invariants[{i}]: max must be a finite number"));
                }
            }
        }
    }
    for (i, p) in cfg.shared.iter().enumerate() {
        check_pointer(&mut problems, p, &format!("shared[{i}]"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::new(
            ErrorCode::ValidationFailed,
            format!("scope configuration is invalid: {}", problems.join("; ")),
        )
        .with_details(serde_json::json!({ "problems": problems })))
    }
}

/// Every schema violation of one document.
pub fn schema_violations(schema: &Schema, agent: &AgentId, doc: &Value) -> Vec<Violation> {
    schema
        .iter_errors(doc)
        .map(|e| Violation {
            agent: Some(agent.clone()),
            pointer: e.instance_path().as_str().to_owned(),
            rule: format!("schema:{}", e.schema_path().as_str()),
            message: e.to_string(),
            agents: Vec::new(),
        })
        .collect()
}

/// Every invariant violation over `docs`. `registered` is the set of agents
/// the allocator knows, needed only by `registered_agent` rules.
pub fn invariant_violations(
    invariants: &[Invariant],
    docs: &BTreeMap<AgentId, Value>,
    registered: &BTreeSet<AgentId>,
) -> Vec<Violation> {
    let mut out = Vec::new();
    for inv in invariants {
        match inv {
            Invariant::Agree { pointer, agents } => agree(pointer, agents, docs, &mut out),
            Invariant::RegisteredAgent { pointer } => {
                for (agent, doc) in docs {
                    let Some(v) = doc.pointer(pointer) else {
                        continue;
                    };
                    let known = v
                        .as_str()
                        .and_then(|s| AgentId::new(s).ok())
                        .is_some_and(|id| registered.contains(&id));
                    if !known {
                        out.push(Violation {
                            agent: Some(agent.clone()),
                            pointer: pointer.clone(),
                            rule: "registered_agent".into(),
                            message: format!("{v} does not name a registered agent"),
                            agents: Vec::new(),
                        });
                    }
                }
            }
            Invariant::SumAtMost { pointer, max } => {
                let mut sum = 0.0;
                let mut contributors = Vec::new();
                for (agent, doc) in docs {
                    match doc.pointer(pointer) {
                        None => {}
                        Some(Value::Number(n)) => {
                            sum += n.as_f64().unwrap_or(0.0);
                            contributors.push(agent.clone());
                        }
                        Some(other) => out.push(Violation {
                            agent: Some(agent.clone()),
                            pointer: pointer.clone(),
                            rule: "sum_at_most".into(),
                            message: format!("{other} is not a number"),
                            agents: Vec::new(),
                        }),
                    }
                }
                if sum > *max {
                    out.push(Violation {
                        agent: None,
                        pointer: pointer.clone(),
                        rule: "sum_at_most".into(),
                        message: format!("the values add up to {sum}, more than {max}"),
                        agents: contributors,
                    });
                }
            }
        }
    }
    out
}

fn agree(
    pointer: &str,
    agents: &[AgentId],
    docs: &BTreeMap<AgentId, Value>,
    out: &mut Vec<Violation>,
) {
    let named: Vec<&AgentId> = if agents.is_empty() {
        docs.keys().collect()
    } else {
        agents.iter().collect()
    };
    let mut values: BTreeMap<&AgentId, Option<&Value>> = BTreeMap::new();
    for agent in named {
        match docs.get(agent) {
            Some(doc) => {
                values.insert(agent, doc.pointer(pointer));
            }
            None => out.push(Violation {
                agent: Some(agent.clone()),
                pointer: pointer.to_owned(),
                rule: "agree".into(),
                message: "the agent has no document to agree with".into(),
                agents: Vec::new(),
            }),
        }
    }
    let Some(majority) = most_common(values.values().copied()) else {
        return;
    };
    for (agent, v) in values {
        if v != majority {
            let shown = |v: Option<&Value>| v.map_or("nothing".to_owned(), Value::to_string);
            out.push(Violation {
                agent: Some(agent.clone()),
                pointer: pointer.to_owned(),
                rule: "agree".into(),
                message: format!("has {}, most agents have {}", shown(v), shown(majority)),
                agents: Vec::new(),
            });
        }
    }
}

/// The most frequent value; ties go to the smallest JSON text so the answer
/// does not depend on the order documents were read in.
pub fn most_common<'a>(
    values: impl Iterator<Item = Option<&'a Value>>,
) -> Option<Option<&'a Value>> {
    let mut counts: BTreeMap<String, (usize, Option<&'a Value>)> = BTreeMap::new();
    for v in values {
        let key = v.map_or_else(String::new, Value::to_string);
        counts.entry(key).or_insert((0, v)).0 += 1;
    }
    let best = counts.values().map(|(n, _)| *n).max()?;
    counts
        .into_values()
        .find(|(n, _)| *n == best)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn a(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    #[test]
    fn schema_violations_name_agent_pointer_and_keyword() {
        let schema = compile_schema(&json!({
            "type": "object",
            "properties": {"budget": {"type": "number", "minimum": 0}},
            "required": ["budget"]
        }))
        .unwrap();
        let v = schema_violations(&schema, &a("w1"), &json!({"budget": -1}));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].pointer, "/budget");
        assert_eq!(v[0].rule, "schema:/properties/budget/minimum");
        assert!(schema_violations(&schema, &a("w1"), &json!({"budget": 2})).is_empty());
        assert_eq!(
            compile_schema(&json!({"type": 12})).unwrap_err().code,
            ErrorCode::ValidationFailed
        );
    }

    #[test]
    fn invariants_report_every_breaker() {
        let docs: BTreeMap<AgentId, Value> = [
            (
                a("a1"),
                json!({"plan": {"id": 1}, "budget": 5, "leader": "a1"}),
            ),
            (
                a("a2"),
                json!({"plan": {"id": 1}, "budget": 4, "leader": "ghost"}),
            ),
            (a("a3"), json!({"plan": {"id": 2}, "budget": "lots"})),
        ]
        .into();
        let registered: BTreeSet<AgentId> = [a("a1"), a("a2")].into();
        let v = invariant_violations(
            &[
                Invariant::Agree {
                    pointer: "/plan/id".into(),
                    agents: vec![],
                },
                Invariant::RegisteredAgent {
                    pointer: "/leader".into(),
                },
                Invariant::SumAtMost {
                    pointer: "/budget".into(),
                    max: 8.0,
                },
                Invariant::Agree {
                    pointer: "/plan/id".into(),
                    agents: vec![a("a1"), a("zz")],
                },
            ],
            &docs,
            &registered,
        );
        let seen: Vec<(Option<&str>, &str, &str)> = v
            .iter()
            .map(|x| {
                (
                    x.agent.as_ref().map(AgentId::as_str),
                    x.pointer.as_str(),
                    x.rule.as_str(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (Some("a3"), "/plan/id", "agree"),
                (Some("a2"), "/leader", "registered_agent"),
                (Some("a3"), "/budget", "sum_at_most"),
                (None, "/budget", "sum_at_most"),
                (Some("zz"), "/plan/id", "agree"),
            ]
        );
        assert_eq!(v[3].agents, vec![a("a1"), a("a2")]);
    }

    #[test]
    fn configs_with_bad_pointers_or_schemas_are_refused_with_every_problem() {
        let cfg: ScopeConfig = serde_json::from_value(json!({
            "scope": "s",
            "schema": {"type": "nope"},
            "invariants": [{"type": "agree", "pointer": "plan"}],
            "shared": ["/ok", "bad"]
        }))
        .unwrap();
        let e = check_config(&cfg).unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationFailed);
        assert_eq!(e.details["problems"].as_array().unwrap().len(), 3);
    }
}
