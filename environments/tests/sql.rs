//! `sql` through the public API: equivalent queries pass, near misses do not.

use chorus_environments::{Split, builtin_registry};

#[test]
fn equivalent_rewrites_pass_and_order_matters_only_when_asked() {
    let env = builtin_registry().get("sql").unwrap();
    assert_eq!(
        serde_json::to_value(env.info()).unwrap()["category"],
        "data"
    );
    let mut ordered_seen = false;
    let mut unordered_seen = false;
    for (seed, level) in [
        (1, 0),
        (2, 1),
        (3, 2),
        (4, 3),
        (5, 4),
        (6, 5),
        (7, 6),
        (8, 5),
    ] {
        let task = env.sample(seed, Split::Heldout, level).unwrap();
        let gold = env.reference(&task).unwrap();
        let fenced = format!("<think>one query</think>```sql\n{gold};\n```");
        assert!(env.score(&task, &fenced).unwrap().is_full(), "{gold}");
        // The same rows through a subquery, in reverse order of the first column.
        let reordered = format!("SELECT * FROM ({gold}) ORDER BY 1 DESC");
        let same_rows = env.score(&task, &reordered).unwrap();
        if gold.contains("ORDER BY") {
            ordered_seen = true;
            // Rows come back in a different order; some orders coincide (a single row).
            if !same_rows.is_full() {
                assert!(same_rows.reason.contains("order"), "{}", same_rows.reason);
            }
        } else {
            unordered_seen = true;
            assert!(same_rows.is_full(), "{gold}: {same_rows:?}");
        }
        let extra_column = format!("SELECT *, 1 FROM ({gold})");
        let score = env.score(&task, &extra_column).unwrap();
        assert!(
            !score.is_full() && score.reason.contains("column"),
            "{score:?}"
        );
    }
    assert!(ordered_seen && unordered_seen);
}
