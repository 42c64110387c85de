//! Layout and encoding of flows in KV, without a server.

use super::*;

#[test]
fn small_flows_stay_in_one_entry_and_large_ones_fit_one_batch() {
    assert_eq!(page_count(PAGE_TASKS), 0);
    assert_eq!(page_count(PAGE_TASKS + 1), 2);
    assert_eq!(page_count(100_000), 100);
    assert_eq!(page_count(10_000_000), MAX_PAGES as u32);
}

fn flow(n: usize) -> Flow {
    Flow::independent(n)
}

#[test]
fn only_changed_pages_are_written_and_a_grown_flow_is_paged_again() {
    let mut f = flow(5 * PAGE_TASKS);
    let kept = Kept {
        writer: None,
        pages: lay_out(&f),
        outbox: Vec::new(),
    };
    let (first, dirty) = encode(&mut f, kept, None).unwrap();
    assert_eq!(dirty, (0..5).collect::<Vec<_>>());
    let step = first.kept.pages.as_ref().unwrap().step;
    let (same, dirty) = encode(&mut f, first.kept.clone(), Some(&first)).unwrap();
    assert!(dirty.is_empty());
    assert_eq!(same, first, "nothing changed, nothing re-stamped");
    let t = TaskId::new("t7").unwrap();
    f.tasks.get_mut(&t).unwrap().attempt = 9;
    let (next, dirty) = encode(&mut f, first.kept.clone(), Some(&first)).unwrap();
    let p = next.kept.pages.as_ref().unwrap();
    assert_eq!(dirty, vec![page_of(&t, p)]);
    assert_eq!((p.step, p.steps[dirty[0]]), (step + 1, step + 1));

    // An unpaged flow grown past a page, and a page grown past its share.
    let mut small = flow(3 * PAGE_TASKS);
    let (enc, dirty) = encode(&mut small, Kept::default(), None).unwrap();
    assert_eq!((enc.pages.len(), dirty.len()), (3, 3));
    let mut big = flow(12 * PAGE_TASKS);
    let kept = Kept {
        writer: None,
        pages: Some(Pages {
            count: 2,
            step: 1,
            steps: vec![1; 2],
            bounds: vec![TaskId::new("t5").unwrap()],
        }),
        outbox: Vec::new(),
    };
    let (enc, _) = encode(&mut big, kept, None).unwrap();
    assert_eq!(enc.pages.len(), 12);
}

#[test]
fn the_outbox_is_left_out_of_the_comparison_and_task_inputs_do_not_fool_it() {
    let mut f = flow(2);
    f.tasks
        .get_mut(&TaskId::new("t0").unwrap())
        .unwrap()
        .spec
        .input = serde_json::json!({"x": 1, "outbox": [1]});
    let (plain, _) = encode(&mut f, Kept::default(), None).unwrap();
    let kept = Kept {
        writer: None,
        pages: None,
        outbox: vec![Staged {
            at_ms: 5,
            events: vec![crate::outbox::Numbered {
                n: 0,
                kind: common::msg::EventKind::FlowPaused {
                    flow_id: f.id.clone(),
                },
            }],
        }],
    };
    let (with_events, _) = encode(&mut f, kept, None).unwrap();
    assert_ne!(plain.header, with_events.header);
    assert_eq!(
        before_outbox(&plain.header),
        before_outbox(&with_events.header)
    );
    assert!(
        before_outbox(&plain.header).ends_with(b"}}"),
        "cut at the field, not the input"
    );
}

#[test]
fn a_header_reads_back_as_the_flow_and_what_the_store_keeps() {
    let mut f = flow(3);
    let kept = Kept {
        writer: None,
        pages: None,
        outbox: vec![Staged {
            at_ms: 5,
            events: Vec::new(),
        }],
    };
    let (enc, _) = encode(&mut f, kept.clone(), None).unwrap();
    let text = std::str::from_utf8(&enc.header).unwrap();
    assert!(
        text.ends_with(r#","outbox":[{"at_ms":5,"events":[]}]}"#),
        "{text}"
    );
    let back: Flow = serde_json::from_slice(&enc.header).unwrap();
    assert_eq!(back, f);
    let kept_back: Kept = serde_json::from_slice(&enc.header).unwrap();
    assert_eq!(kept_back, kept);
}

#[test]
fn the_tasks_part_is_found_again_in_a_page_value() {
    let v = page_value(7, br#"{"a":{"x":"\"tasks\":"}}"#);
    assert_eq!(
        tasks_part(&v).unwrap(),
        Bytes::from_static(br#"{"a":{"x":"\"tasks\":"}}"#)
    );
}
