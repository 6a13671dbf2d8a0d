//! `knights_knaves`: knights always tell the truth, knaves always lie; decide who is which.
//!
//! Puzzles are generated from a hidden assignment: each person makes a random claim, negated when
//! needed so that knights' claims are true and knaves' false; a puzzle is kept only when brute
//! force over all 2^n assignments finds exactly one consistent solution. Level 0 has two people
//! making simple claims (with and/or); higher levels add people (up to 6) and richer claims
//! (same kind, different kinds).

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::task::{Score, Split, Task};

const NAME: &str = "knights_knaves";
const MAX_DIFFICULTY: u32 = 8;
const PEOPLE: [&str; 6] = ["A", "B", "C", "D", "E", "F"];

/// Knights-and-knaves puzzles with unique solutions.
#[derive(Debug, Clone, Default)]
pub struct KnightsKnaves;

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    /// `true` = knight, per person in order.
    knights: Vec<bool>,
}

#[derive(Debug, Clone)]
enum Claim {
    Is { person: usize, knight: bool },
    And(Box<Claim>, Box<Claim>),
    Or(Box<Claim>, Box<Claim>),
    SameKind(usize, usize),
    DifferentKinds(usize, usize),
}

impl Claim {
    fn holds(&self, knights: &[bool]) -> bool {
        match self {
            Claim::Is { person, knight } => knights[*person] == *knight,
            Claim::And(a, b) => a.holds(knights) && b.holds(knights),
            Claim::Or(a, b) => a.holds(knights) || b.holds(knights),
            Claim::SameKind(a, b) => knights[*a] == knights[*b],
            Claim::DifferentKinds(a, b) => knights[*a] != knights[*b],
        }
    }

    fn render(&self, speaker: usize) -> String {
        let who = |person: usize| {
            if person == speaker {
                "I".to_string()
            } else {
                PEOPLE[person].to_string()
            }
        };
        match self {
            Claim::Is { person, knight } => {
                let kind = if *knight { "knight" } else { "knave" };
                if *person == speaker {
                    format!("I am a {kind}")
                } else {
                    format!("{} is a {kind}", PEOPLE[*person])
                }
            }
            Claim::And(a, b) => format!("{} and {}", a.render(speaker), b.render(speaker)),
            Claim::Or(a, b) => format!("{} or {}", a.render(speaker), b.render(speaker)),
            Claim::SameKind(a, b) => format!("{} and {} are the same kind", who(*a), who(*b)),
            Claim::DifferentKinds(a, b) => {
                format!("{} and {} are different kinds", who(*a), who(*b))
            }
        }
    }

    /// The opposite claim, in plain words (De Morgan rather than "it is false that").
    fn negated(self) -> Claim {
        match self {
            Claim::Is { person, knight } => Claim::Is {
                person,
                knight: !knight,
            },
            Claim::And(a, b) => Claim::Or(Box::new(a.negated()), Box::new(b.negated())),
            Claim::Or(a, b) => Claim::And(Box::new(a.negated()), Box::new(b.negated())),
            Claim::SameKind(a, b) => Claim::DifferentKinds(a, b),
            Claim::DifferentKinds(a, b) => Claim::SameKind(a, b),
        }
    }
}

fn random_atom(rng: &mut TaskRng, person: usize) -> Claim {
    Claim::Is {
        person,
        knight: rng.random_bool(0.5),
    }
}

/// Two different people.
fn random_pair(rng: &mut TaskRng, people: usize) -> (usize, usize) {
    let a = rng.random_range(0..people);
    (a, (a + rng.random_range(1..people)) % people)
}

fn random_claim(rng: &mut TaskRng, people: usize, level: u32) -> Claim {
    // Plain claims about others alone never pin down a unique answer (swapping everyone's kind
    // keeps them consistent), so even level 0 needs `and`/`or`.
    let kinds = if level < 4 { 3 } else { 4 };
    let (a, b) = random_pair(rng, people);
    match rng.random_range(0..kinds) {
        0 => random_atom(rng, a),
        1 => Claim::And(Box::new(random_atom(rng, a)), Box::new(random_atom(rng, b))),
        2 => Claim::Or(Box::new(random_atom(rng, a)), Box::new(random_atom(rng, b))),
        _ => Claim::SameKind(a, b),
    }
}

/// How many assignments make every knight's claim true and every knave's false (stops at 2).
fn count_solutions(claims: &[Claim]) -> usize {
    let people = claims.len();
    let mut found = 0;
    for mask in 0..(1u32 << people) {
        let knights: Vec<bool> = (0..people).map(|i| mask & (1 << i) != 0).collect();
        if claims
            .iter()
            .enumerate()
            .all(|(speaker, claim)| claim.holds(&knights) == knights[speaker])
        {
            found += 1;
            if found > 1 {
                break;
            }
        }
    }
    found
}

fn render_answer(knights: &[bool]) -> String {
    knights
        .iter()
        .enumerate()
        .map(|(i, knight)| format!("{}={}", PEOPLE[i], if *knight { "knight" } else { "knave" }))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads `A=knight B=knave`, `A is a knight, B is a knave`, `A: knight` …: each person's name
/// (case-sensitive) followed by the first `knight`/`knave` word after it.
fn parse_assignment(response: &str, people: usize) -> Result<Vec<bool>, String> {
    let mut assigned: Vec<Option<bool>> = vec![None; people];
    let mut current: Option<usize> = None;
    for word in response
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if let Some(person) = PEOPLE[..people].iter().position(|name| *name == word) {
            current = Some(person);
            continue;
        }
        let lower = word.to_lowercase();
        let kind = if lower.starts_with("knight") {
            Some(true)
        } else if lower.starts_with("knave") {
            Some(false)
        } else {
            None
        };
        if let (Some(person), Some(knight)) = (current, kind) {
            if assigned[person].is_some_and(|previous| previous != knight) {
                return Err(format!(
                    "{} is called both a knight and a knave",
                    PEOPLE[person]
                ));
            }
            assigned[person] = Some(knight);
            current = None;
        }
    }
    let missing: Vec<&str> = (0..people)
        .filter(|i| assigned[*i].is_none())
        .map(|i| PEOPLE[i])
        .collect();
    if !missing.is_empty() {
        return Err(format!("no verdict for {}", missing.join(", ")));
    }
    Ok(assigned.into_iter().map(|a| a.unwrap_or(false)).collect())
}

impl Environment for KnightsKnaves {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::Logic,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description:
                "Knights-and-knaves puzzles with a unique solution; name each person's kind".into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let people = (2 + (level as usize).div_ceil(2)).min(PEOPLE.len());
        let (key, knights) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let knights: Vec<bool> = (0..people).map(|_| rng.random_bool(0.5)).collect();
            let claims: Vec<Claim> = (0..people)
                .map(|speaker| {
                    let claim = random_claim(rng, people, level);
                    if claim.holds(&knights) == knights[speaker] {
                        claim
                    } else {
                        claim.negated()
                    }
                })
                .collect();
            if count_solutions(&claims) != 1 {
                return None;
            }
            let lines: Vec<String> = claims
                .iter()
                .enumerate()
                .map(|(speaker, claim)| format!("{}: {}.", PEOPLE[speaker], claim.render(speaker)))
                .collect();
            Some((lines.join("\n"), knights))
        })?;
        let content = format!("Knights tell the truth, knaves lie.\n{key}\nWho is what?");
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        make_task(
            origin,
            &key,
            vec![Message::user(content)],
            &Verification { knights },
        )
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        if expected.knights.is_empty() || expected.knights.len() > PEOPLE.len() {
            return Err(task.invalid_verification(format!("{} people", expected.knights.len())));
        }
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let given = match parse_assignment(&response, expected.knights.len()) {
            Ok(given) => given,
            Err(reason) => return Ok(Score::zero(reason).with_component("format", 0.0)),
        };
        let right = given
            .iter()
            .zip(&expected.knights)
            .filter(|(a, b)| a == b)
            .count();
        let total = expected.knights.len();
        let reason = if right == total {
            "every verdict is right".to_string()
        } else {
            format!(
                "{right}/{total} verdicts right; solution {}",
                render_answer(&expected.knights)
            )
        };
        Ok(Score::binary(right == total, reason)
            .with_component("format", 1.0)
            .with_component("people_right", right as f64 / total as f64))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        Ok(render_answer(
            &task.verification_as::<Verification>()?.knights,
        ))
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let knights = task.verification_as::<Verification>()?.knights;
        if knights.is_empty() {
            return Err(task.invalid_verification("no islanders to answer about"));
        }
        let mut flipped = knights.clone();
        flipped[0] = !flipped[0];
        let all_knights = vec![true; knights.len()];
        let mut wrong = vec![render_answer(&flipped), "A=knight".to_string()];
        if all_knights != knights {
            wrong.push(render_answer(&all_knights));
        }
        Ok(wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn a_task_without_islanders_is_refused_not_a_panic() {
        let env = KnightsKnaves;
        let mut task = env.sample(1, Split::Train, 1).unwrap();
        task.verification["knights"] = serde_json::json!([]);
        let err = env.wrong_completions(&task).unwrap_err();
        assert!(err.to_string().contains("no islanders"), "{err}");
    }

    #[test]
    fn self_check_passes() {
        assert_self_check_passes(&KnightsKnaves, &[0, 1, 2, 4, 6, 8], 8);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&KnightsKnaves, 0, 100);
        assert_splits_disjoint(&KnightsKnaves, 5, 100);
    }

    #[test]
    fn solutions_are_unique_by_construction() {
        // A: "B is a knave." B: "A is a knave." has two solutions and must be rejected.
        let ambiguous = [
            Claim::Is {
                person: 1,
                knight: false,
            },
            Claim::Is {
                person: 0,
                knight: false,
            },
        ];
        assert_eq!(count_solutions(&ambiguous), 2);
        // A: "I am a knave." has none.
        assert_eq!(
            count_solutions(&[Claim::Is {
                person: 0,
                knight: false
            }]),
            0
        );
    }

    #[test]
    fn answers_in_several_styles() {
        assert_eq!(
            parse_assignment("A is a knight, and B is a knave.", 2),
            Ok(vec![true, false])
        );
        assert_eq!(
            parse_assignment("A: Knave\nB: Knight", 2),
            Ok(vec![false, true])
        );
        assert!(parse_assignment("A=knight", 2).unwrap_err().contains("B"));
        assert!(parse_assignment("A=knight A=knave B=knave", 2).is_err());
    }

    #[test]
    fn level_zero_prompt_is_short() {
        let task = train_task(&KnightsKnaves, 0, 0);
        assert!(
            task.prompt[0].content.len() < 130,
            "{}",
            task.prompt[0].content
        );
    }
}
