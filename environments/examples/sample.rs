//! Prints one task per built-in environment and difficulty with the reference policy's full
//! episode and its score: `cargo run -p chorus-environments --example sample -- [ENV] [LEVEL] [SEED]`.

use chorus_environments::chat::render_conversation;
use chorus_environments::{Split, builtin_registry};

fn main() -> Result<(), chorus_environments::EnvError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let registry = builtin_registry();
    let names = match args.first() {
        Some(name) => vec![name.clone()],
        None => registry.names(),
    };
    let difficulty: Option<u32> = args.get(1).and_then(|d| d.parse().ok());
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    for name in names {
        let env = registry.get(&name)?;
        let info = env.info();
        let levels = match difficulty {
            Some(level) => vec![level],
            None => vec![0, info.max_difficulty / 2],
        };
        for level in levels {
            let task = env.sample(seed, Split::Train, level)?;
            let mut episode = env.start(&task)?;
            let mut score = None;
            while score.is_none() && episode.turn < info.max_turns {
                let action = env.reference_action(&task, &episode)?;
                score = env.step(&task, &mut episode, &action)?.score;
            }
            println!("=== {name} level {level} ({})", task.id);
            println!("{}", render_conversation(&episode.messages));
            match score {
                Some(score) => println!("--- reward {}: {}\n", score.reward, score.reason),
                None => println!("--- unfinished after {} turns\n", info.max_turns),
            }
        }
    }
    Ok(())
}
