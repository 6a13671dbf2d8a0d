//! `chorus env` end to end.

mod harness;

use harness::*;

#[test]
fn list_json_has_the_documented_keys() {
    let h = Harness::new();
    let v: serde_json::Value = serde_json::from_str(&h.ok(&["env", "list", "--json"])).unwrap();
    let list = v.as_array().unwrap();
    assert!(list.len() >= 15);
    for e in list {
        for k in ["name", "category", "turns", "description"] {
            assert!(
                e.get(k).is_some_and(|x| x.is_string()),
                "{k} missing in {e}"
            );
        }
    }
    assert!(list.iter().any(|e| e["name"] == "arithmetic"));
}

#[test]
fn sampling_is_deterministic_and_splits_differ() {
    let h = Harness::new();
    let a = h.ok(&["env", "sample", "countdown", "--seed", "4", "--json"]);
    let b = h.ok(&["env", "sample", "countdown", "--seed", "4", "--json"]);
    assert_eq!(a, b);
    let v: serde_json::Value = serde_json::from_str(&a).unwrap();
    assert_eq!(v["reference_score"]["reward"], 1.0);
    let held = h.ok(&[
        "env",
        "sample",
        "countdown",
        "--seed",
        "4",
        "--split",
        "heldout",
        "--json",
    ]);
    let w: serde_json::Value = serde_json::from_str(&held).unwrap();
    assert_ne!(v["task"]["id"], w["task"]["id"]);
}

#[test]
fn check_all_passes_and_bad_names_are_explained() {
    let h = Harness::new();
    let out = h.ok(&["env", "check", "--all", "--tasks", "2"]);
    assert!(out.lines().count() >= 15 && !out.contains("FAIL"), "{out}");
    let err = h.fails(&["env", "sample", "no_such_env"]);
    assert!(
        err.contains("no_such_env") && err.contains("arithmetic"),
        "{err}"
    );
    let err = h.fails(&["env", "sample", "arithmetic", "--split", "test"]);
    assert!(err.contains("split"), "{err}");
}
