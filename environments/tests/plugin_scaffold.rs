//! What `chorus env new NAME --lang rust` writes builds against this crate and works: the file
//! generated for `my_env` is compiled here as a module (its own tests run with this binary),
//! and this test holds it equal to what the generator writes today.

#[path = "plugin_scaffold/my_env.rs"]
mod my_env;

use chorus_environments::plugin::scaffold::rust_source;
use chorus_environments::{CheckOptions, Environment, Split, check_environment};

#[test]
fn the_compiled_scaffold_is_what_the_generator_writes() {
    assert_eq!(
        rust_source("my_env").unwrap(),
        include_str!("plugin_scaffold/my_env.rs"),
        "regenerate environments/tests/plugin_scaffold/my_env.rs with \
         `chorus env new my_env --lang rust --dir environments/tests/plugin_scaffold` (delete it first)"
    );
}

#[test]
fn the_scaffold_environment_passes_the_self_check_and_scores() {
    let env = my_env::MyEnv;
    assert_eq!(env.info().name, my_env::NAME);
    let report = check_environment(&env, &CheckOptions::default());
    assert!(report.passed, "{:#?}", report.failures);
    let task = env.sample(4, Split::Heldout, 2).unwrap();
    assert!(
        env.score(&task, &env.reference(&task).unwrap())
            .unwrap()
            .is_full()
    );
    assert!(!env.score(&task, "nothing like it").unwrap().is_full());
}
