//! `calendar`: find a meeting slot that fits everyone's busy times.
//!
//! The prompt lists each person's busy blocks and asks for the start of a slot of a given length
//! inside working hours; any start that fits scores full, so the model need not find the same
//! slot as the reference (the earliest). Level 0 is one person with one busy block in a morning
//! on the hour; higher levels add people (up to 4), blocks, a full working day, half-hour times
//! and longer meetings. Every generated task has at least one valid slot.

use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use crate::chat::{Message, final_answer};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::task::{Score, Split, Task};

const NAME: &str = "calendar";
const MAX_DIFFICULTY: u32 = 8;
const PEOPLE: [&str; 8] = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Ivy"];

/// Meeting scheduling against busy calendars.
#[derive(Debug, Clone, Default)]
pub struct Calendar;

/// Minutes after midnight.
type Minute = u32;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Person {
    name: String,
    busy: Vec<(Minute, Minute)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    day_start: Minute,
    day_end: Minute,
    duration: Minute,
    /// Starts must be multiples of this.
    step: Minute,
    people: Vec<Person>,
}

fn clock(minute: Minute, with_minutes: bool) -> String {
    if with_minutes || !minute.is_multiple_of(60) {
        format!("{}:{:02}", minute / 60, minute % 60)
    } else {
        (minute / 60).to_string()
    }
}

impl Verification {
    /// Why a meeting starting at `start` does not fit, if it does not.
    fn conflict(&self, start: Minute) -> Option<String> {
        let end = start + self.duration;
        let precise = self.step < 60;
        if start < self.day_start || end > self.day_end {
            return Some(format!(
                "{}-{} is outside {}-{}",
                clock(start, precise),
                clock(end, precise),
                clock(self.day_start, precise),
                clock(self.day_end, precise)
            ));
        }
        for person in &self.people {
            if let Some((from, to)) = person
                .busy
                .iter()
                .find(|(from, to)| start < *to && *from < end)
            {
                return Some(format!(
                    "{} is busy {}-{}",
                    person.name,
                    clock(*from, precise),
                    clock(*to, precise)
                ));
            }
        }
        None
    }

    fn earliest_slot(&self) -> Option<Minute> {
        if self.step == 0 {
            return None;
        }
        (self.day_start..=self.day_end.saturating_sub(self.duration))
            .step_by(self.step as usize)
            .find(|&start| self.conflict(start).is_none())
    }
}

fn generate(rng: &mut TaskRng, level: u32) -> Option<Verification> {
    let people = (1 + level as usize / 2).min(4);
    let blocks = 1 + level as usize / 3;
    let step = if level >= 3 { 30 } else { 60 };
    let (day_start, day_end) = if level == 0 {
        (9 * 60, 12 * 60)
    } else {
        (9 * 60, 17 * 60)
    };
    let duration = match level {
        0..=2 => 60,
        _ => *[30, 60, 90].choose(rng)?,
    };
    let chosen: Vec<&str> = PEOPLE.choose_multiple(rng, people).copied().collect();
    let slots = (day_end - day_start) / step;
    let mut persons = Vec::new();
    for name in chosen {
        let mut busy: Vec<(Minute, Minute)> = Vec::new();
        for _ in 0..blocks {
            let start = day_start + rng.random_range(0..slots) * step;
            let length = step * rng.random_range(1..=2);
            let end = (start + length).min(day_end);
            if busy.iter().all(|(from, to)| end <= *from || *to <= start) {
                busy.push((start, end));
            }
        }
        busy.sort_unstable();
        persons.push(Person {
            name: name.to_string(),
            busy,
        });
    }
    let verification = Verification {
        day_start,
        day_end,
        duration,
        step,
        people: persons,
    };
    verification.earliest_slot().map(|_| verification)
}

fn render(v: &Verification) -> String {
    let precise = v.step < 60;
    let mut lines: Vec<String> = v
        .people
        .iter()
        .map(|person| {
            let blocks: Vec<String> = person
                .busy
                .iter()
                .map(|(from, to)| format!("{}-{}", clock(*from, precise), clock(*to, precise)))
                .collect();
            format!("{} busy {}.", person.name, blocks.join(", "))
        })
        .collect();
    let who = if v.people.len() == 1 { "" } else { " for all" };
    lines.push(format!(
        "Start of a free {} min slot{who}, {}-{}?",
        v.duration,
        clock(v.day_start, precise),
        clock(v.day_end, precise)
    ));
    lines.join("\n")
}

/// Reads the first time in the answer: `10`, `10:30`, `2pm`, `2:30 pm`, `14:00-15:00`.
fn parse_time(answer: &str) -> Option<Minute> {
    let lower = answer.to_lowercase();
    let start = lower.find(|c: char| c.is_ascii_digit())?;
    let rest = &lower[start..];
    let hour_text: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let mut hour: Minute = hour_text.parse().ok()?;
    let mut after = &rest[hour_text.len()..];
    let mut minute = 0;
    if let Some(tail) = after.strip_prefix(':').or_else(|| after.strip_prefix('.')) {
        let minute_text: String = tail.chars().take_while(char::is_ascii_digit).collect();
        if minute_text.len() != 2 {
            return None;
        }
        minute = minute_text.parse().ok()?;
        after = &tail[2..];
    }
    let after = after.trim_start();
    if after.starts_with("pm") && hour < 12 {
        hour += 12;
    } else if after.starts_with("am") && hour == 12 {
        hour = 0;
    }
    (hour < 24 && minute < 60).then_some(hour * 60 + minute)
}

impl Environment for Calendar {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::Planning,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 0.5,
            max_difficulty: MAX_DIFFICULTY,
            description:
                "Find a meeting start time that fits everyone's busy blocks; any valid slot counts"
                    .into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let (key, verification) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let verification = generate(rng, level)?;
            Some((render(&verification), verification))
        })?;
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        make_task(
            origin,
            &key,
            vec![Message::user(key.clone())],
            &verification,
        )
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        if expected.step == 0 {
            return Err(task.invalid_verification("the time grid step is 0"));
        }
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let Some(start) = parse_time(final_answer(&response)) else {
            return Ok(Score::zero("no time in the answer").with_component("format", 0.0));
        };
        if start % expected.step != 0 {
            let reason = format!(
                "{} is not on the {} minute grid",
                clock(start, true),
                expected.step
            );
            return Ok(Score::zero(reason).with_component("format", 1.0));
        }
        Ok(match expected.conflict(start) {
            None => Score::full(format!("{} fits everyone", clock(start, true))),
            Some(conflict) => Score::zero(conflict),
        }
        .with_component("format", 1.0))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let start = expected
            .earliest_slot()
            .ok_or_else(|| EnvError::NoReference {
                env: NAME.into(),
                task_id: task.id.clone(),
                reason: "no slot fits".into(),
            })?;
        Ok(clock(start, expected.step < 60))
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let precise = expected.step < 60;
        let mut wrong: Vec<String> = expected
            .people
            .iter()
            .flat_map(|p| p.busy.iter().map(|(from, _)| clock(*from, precise)))
            .take(2)
            .collect();
        wrong.push(clock(expected.day_end, precise));
        wrong.push("25:00".into());
        Ok(wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes() {
        assert_self_check_passes(&Calendar, &[0, 1, 3, 5, 8], 10);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&Calendar, 0, 100);
        assert_splits_disjoint(&Calendar, 5, 100);
    }

    #[test]
    fn times_are_read_in_common_styles() {
        assert_eq!(parse_time("10"), Some(600));
        assert_eq!(parse_time("10:30"), Some(630));
        assert_eq!(parse_time("2pm"), Some(840));
        assert_eq!(parse_time("2:30 pm"), Some(870));
        assert_eq!(parse_time("at 14:00-15:00"), Some(840));
        assert_eq!(parse_time("10:3"), None);
        assert_eq!(parse_time("noon"), None);
        assert_eq!(parse_time("99"), None);
    }

    #[test]
    fn every_fitting_start_counts() {
        let task = Task {
            verification: serde_json::json!({
                "day_start": 540, "day_end": 720, "duration": 60, "step": 60,
                "people": [{"name": "Ann", "busy": [[600, 660]]}]
            }),
            ..train_task(&Calendar, 0, 0)
        };
        assert_eq!(reward(&Calendar, &task, "9"), 1.0);
        assert_eq!(reward(&Calendar, &task, "11:00"), 1.0);
        assert_eq!(reward(&Calendar, &task, "10"), 0.0);
        assert_eq!(reward(&Calendar, &task, "9:30"), 0.0, "off the grid");
        assert_eq!(reward(&Calendar, &task, "12"), 0.0, "ends after the day");
    }

    #[test]
    fn level_zero_prompt_is_short() {
        let task = train_task(&Calendar, 2, 0);
        assert!(
            task.prompt[0].content.len() < 64,
            "{}",
            task.prompt[0].content
        );
    }
}
