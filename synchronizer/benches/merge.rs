//! Micro-benchmark of the three-way merge on documents shaped like agent
//! state: a few hundred keys, nested two levels, edits on both sides.

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Map, Value};
use synchronizer::machine::merge::{merge3, Side};

fn doc(keys: usize, tweak: impl Fn(usize) -> Option<i64>) -> Value {
    let mut root = Map::new();
    for i in 0..keys {
        let v = tweak(i).unwrap_or(i as i64);
        root.insert(
            format!("k{i}"),
            json!({"value": v, "label": format!("item {i}"), "tags": ["a", "b"]}),
        );
    }
    Value::Object(root)
}

fn bench(c: &mut Criterion) {
    for keys in [10usize, 100, 1000] {
        let base = doc(keys, |_| None);
        // Theirs edits every 7th key, ours every 5th: some overlap, mostly disjoint.
        let theirs = doc(keys, |i| (i % 7 == 0).then_some(-1));
        let ours = doc(keys, |i| (i % 5 == 0).then_some(-2));
        c.bench_function(&format!("merge3 {keys} keys"), |b| {
            b.iter(|| merge3(Some(&base), &theirs, &ours, Side::Ours))
        });
        c.bench_function(&format!("merge3 {keys} keys, base aged out"), |b| {
            b.iter(|| merge3(None, &theirs, &ours, Side::Ours))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
