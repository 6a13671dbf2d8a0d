//! `sudoku`: fill a 4x4, 6x6 or 9x9 grid; every generated puzzle has a unique solution.
//!
//! A solved grid comes from the standard pattern shuffled by symmetries that keep it valid
//! (digits, rows within bands, bands, columns within stacks, stacks); cells are then blanked in
//! random order while the solver still finds exactly one solution. Level 0 is a 4x4 grid with a
//! single blank; 6x6 arrives at level 4 and 9x9 at level 7. A completion is checked for validity
//! and for keeping the givens, so any correct solution counts.

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::task::{Score, Split, Task};

const NAME: &str = "sudoku";
const MAX_DIFFICULTY: u32 = 10;

/// Sudoku puzzles of three sizes.
#[derive(Debug, Clone, Default)]
pub struct Sudoku;

/// Grid geometry: `box_rows x box_cols` boxes, side `box_rows * box_cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Shape {
    box_rows: usize,
    box_cols: usize,
}

impl Shape {
    fn side(self) -> usize {
        self.box_rows * self.box_cols
    }

    fn box_of(self, row: usize, col: usize) -> usize {
        (row / self.box_rows) * (self.side() / self.box_cols) + col / self.box_cols
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(try_from = "UncheckedVerification")]
struct Verification {
    shape: Shape,
    /// Row-major cells, 0 = blank.
    givens: Vec<u8>,
    solution: Vec<u8>,
}

/// [`Verification`] as read, before its geometry and digits are checked: a task's verification
/// data comes back from outside (a plugin client, the ledger), and every method indexes the grid
/// by its shape.
#[derive(Deserialize)]
struct UncheckedVerification {
    shape: Shape,
    givens: Vec<u8>,
    solution: Vec<u8>,
}

impl TryFrom<UncheckedVerification> for Verification {
    type Error = String;

    fn try_from(v: UncheckedVerification) -> Result<Self, String> {
        let Shape { box_rows, box_cols } = v.shape;
        // Digits are rendered as one character each, 1 to 9.
        if !(1..=3).contains(&box_rows) || !(1..=3).contains(&box_cols) {
            return Err(format!(
                "shape {box_rows}x{box_cols}: boxes must have 1 to 3 rows and columns"
            ));
        }
        let side = box_rows * box_cols;
        for (name, cells, lowest) in [("givens", &v.givens, 0), ("solution", &v.solution, 1)] {
            if cells.len() != side * side {
                return Err(format!(
                    "{name} has {} cells; a {side}x{side} grid has {}",
                    cells.len(),
                    side * side
                ));
            }
            if let Some(d) = cells.iter().find(|&&d| d < lowest || usize::from(d) > side) {
                return Err(format!(
                    "{name} holds {d}; cells must be {lowest} to {side}"
                ));
            }
        }
        Ok(Verification {
            shape: v.shape,
            givens: v.givens,
            solution: v.solution,
        })
    }
}

/// (shape, blanks wanted) per level.
fn level_plan(level: u32) -> (Shape, usize) {
    let small = Shape {
        box_rows: 2,
        box_cols: 2,
    };
    let medium = Shape {
        box_rows: 2,
        box_cols: 3,
    };
    let large = Shape {
        box_rows: 3,
        box_cols: 3,
    };
    match level {
        0 => (small, 1),
        1 => (small, 3),
        2 => (small, 6),
        3 => (small, 10),
        4 => (medium, 8),
        5 => (medium, 14),
        6 => (medium, 20),
        7 => (large, 20),
        8 => (large, 35),
        9 => (large, 45),
        _ => (large, 60),
    }
}

fn solved_grid(rng: &mut TaskRng, shape: Shape) -> Vec<u8> {
    let side = shape.side();
    let (bands, stacks) = (side / shape.box_rows, side / shape.box_cols);
    let mut digits: Vec<u8> = (1..=side as u8).collect();
    digits.shuffle(rng);
    let shuffled_lines = |rng: &mut TaskRng, groups: usize, per_group: usize| -> Vec<usize> {
        let mut order: Vec<usize> = (0..groups).collect();
        order.shuffle(rng);
        order
            .into_iter()
            .flat_map(|group| {
                let mut within: Vec<usize> = (0..per_group).collect();
                within.shuffle(rng);
                within
                    .into_iter()
                    .map(move |i| group * per_group + i)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let rows = shuffled_lines(rng, bands, shape.box_rows);
    let cols = shuffled_lines(rng, stacks, shape.box_cols);
    let mut grid = vec![0; side * side];
    for (r, &source_row) in rows.iter().enumerate() {
        for (c, &source_col) in cols.iter().enumerate() {
            let pattern = (shape.box_cols * (source_row % shape.box_rows)
                + source_row / shape.box_rows
                + source_col)
                % side;
            grid[r * side + c] = digits[pattern];
        }
    }
    grid
}

/// Counts solutions of `grid` (0 = blank), stopping at `limit`.
fn count_solutions(shape: Shape, grid: &mut [u8], limit: usize) -> usize {
    let side = shape.side();
    let full: u32 = (1 << (side + 1)) - 2;
    let mut best: Option<(usize, u32)> = None;
    for cell in 0..grid.len() {
        if grid[cell] != 0 {
            continue;
        }
        let (row, col) = (cell / side, cell % side);
        let mut used = 0u32;
        for i in 0..side {
            used |= 1 << grid[row * side + i];
            used |= 1 << grid[i * side + col];
        }
        let (box_row, box_col) = (
            row / shape.box_rows * shape.box_rows,
            col / shape.box_cols * shape.box_cols,
        );
        for r in box_row..box_row + shape.box_rows {
            for c in box_col..box_col + shape.box_cols {
                used |= 1 << grid[r * side + c];
            }
        }
        let candidates = full & !used;
        if best.is_none_or(|(_, b)| candidates.count_ones() < b.count_ones()) {
            best = Some((cell, candidates));
            if candidates.count_ones() <= 1 {
                break;
            }
        }
    }
    let Some((cell, candidates)) = best else {
        return 1;
    };
    let mut found = 0;
    for digit in 1..=side as u8 {
        if candidates & (1 << digit) != 0 {
            grid[cell] = digit;
            found += count_solutions(shape, grid, limit - found);
            grid[cell] = 0;
            if found >= limit {
                break;
            }
        }
    }
    found
}

fn render_grid(shape: Shape, cells: &[u8]) -> String {
    cells
        .chunks(shape.side())
        .map(|row| {
            row.iter()
                .map(|&d| if d == 0 { '.' } else { char::from(b'0' + d) })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Which rules a filled grid breaks.
fn violations(shape: Shape, cells: &[u8]) -> Vec<String> {
    let side = shape.side();
    let mut broken = Vec::new();
    let mut check = |kind: &str, index: usize, values: Vec<u8>| {
        let mut seen = vec![false; side + 1];
        for value in values {
            let v = value as usize;
            if v == 0 || v > side || std::mem::replace(&mut seen[v], true) {
                broken.push(format!("{kind} {}", index + 1));
                return;
            }
        }
    };
    for i in 0..side {
        check("row", i, (0..side).map(|c| cells[i * side + c]).collect());
        check(
            "column",
            i,
            (0..side).map(|r| cells[r * side + i]).collect(),
        );
        check(
            "box",
            i,
            (0..side * side)
                .filter(|cell| shape.box_of(cell / side, cell % side) == i)
                .map(|cell| cells[cell])
                .collect(),
        );
    }
    broken
}

impl Environment for Sudoku {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::Logic,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description:
                "4x4, 6x6 and 9x9 sudoku with unique solutions; checked for validity and givens"
                    .into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let (shape, blanks) = level_plan(difficulty.min(MAX_DIFFICULTY));
        let (key, verification) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let solution = solved_grid(rng, shape);
            let mut givens = solution.clone();
            let mut order: Vec<usize> = (0..givens.len()).collect();
            order.shuffle(rng);
            let mut removed = 0;
            for cell in order {
                if removed == blanks {
                    break;
                }
                let digit = std::mem::replace(&mut givens[cell], 0);
                if count_solutions(shape, &mut givens.clone(), 2) == 1 {
                    removed += 1;
                } else {
                    givens[cell] = digit;
                }
            }
            Some((
                render_grid(shape, &givens),
                Verification {
                    shape,
                    givens,
                    solution,
                },
            ))
        })?;
        let side = shape.side();
        let content = format!("Fill the {side}x{side} sudoku:\n{key}");
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        make_task(origin, &key, vec![Message::user(content)], &verification)
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        // Deserializing checks the shape, the grids' sizes and their digits.
        let expected: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let cells_wanted = expected.givens.len();
        let digits: Vec<u8> = response
            .bytes()
            .filter(u8::is_ascii_digit)
            .map(|b| b - b'0')
            .collect();
        if digits.len() < cells_wanted {
            return Ok(Score::zero(format!(
                "expected {cells_wanted} digits, found {}",
                digits.len()
            ))
            .with_component("complete", 0.0));
        }
        // The grid is the last `cells_wanted` digits, so a preamble like "4x4:" is harmless.
        let grid = &digits[digits.len() - cells_wanted..];
        let changed = expected
            .givens
            .iter()
            .zip(grid)
            .filter(|(given, cell)| **given != 0 && given != cell)
            .count();
        let broken = violations(expected.shape, grid);
        let correct = changed == 0 && broken.is_empty();
        let reason = if correct {
            "valid grid that keeps every given".to_string()
        } else {
            let mut problems = Vec::new();
            if changed > 0 {
                problems.push(format!("{changed} given(s) changed"));
            }
            if !broken.is_empty() {
                problems.push(format!("broken: {}", broken.join(", ")));
            }
            problems.join("; ")
        };
        Ok(Score::binary(correct, reason)
            .with_component("complete", 1.0)
            .with_component("givens_kept", f64::from(changed == 0))
            .with_component("valid", f64::from(broken.is_empty())))
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        Ok(render_grid(expected.shape, &expected.solution))
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let side = expected.shape.side();
        let mut swapped = expected.solution.clone();
        swapped.swap(0, 1);
        let mut shifted = expected.solution.clone();
        for cell in &mut shifted {
            *cell = *cell % side as u8 + 1;
        }
        Ok(vec![
            render_grid(expected.shape, &swapped),
            render_grid(expected.shape, &shifted),
            render_grid(expected.shape, &expected.givens),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;

    #[test]
    fn self_check_passes() {
        assert_self_check_passes(&Sudoku, &[0, 2, 4, 6, 7, 10], 4);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&Sudoku, 0, 100);
        assert_splits_disjoint(&Sudoku, 5, 30);
    }

    #[test]
    fn generated_puzzles_are_unique_and_sized_by_level() {
        for (level, side) in [(0, 4), (5, 6), (8, 9)] {
            let task = train_task(&Sudoku, 3, level);
            let v: Verification = task.verification_as().unwrap();
            assert_eq!(v.shape.side(), side);
            assert!(violations(v.shape, &v.solution).is_empty());
            assert_eq!(count_solutions(v.shape, &mut v.givens.clone(), 2), 1);
            let blanks = v.givens.iter().filter(|&&d| d == 0).count();
            assert_eq!(blanks, level_plan(level).1.min(blanks), "level {level}");
            assert!(blanks >= 1);
        }
        assert_eq!(
            train_task(&Sudoku, 3, 0)
                .verification_as::<Verification>()
                .unwrap()
                .givens
                .iter()
                .filter(|&&d| d == 0)
                .count(),
            1
        );
    }

    #[test]
    fn preamble_and_spacing_are_tolerated() {
        let task = train_task(&Sudoku, 1, 1);
        let reference = Sudoku.reference(&task).unwrap();
        let spaced: String = reference.chars().flat_map(|c| [c, ' ']).collect();
        assert_eq!(
            reward(&Sudoku, &task, &format!("Here is the 4x4 grid:\n{spaced}")),
            1.0
        );
        assert_eq!(reward(&Sudoku, &task, "1234"), 0.0);
    }

    #[test]
    fn malformed_verification_is_an_error_not_a_panic() {
        let task = train_task(&Sudoku, 2, 1);
        type Breakage = fn(&mut serde_json::Value);
        let breakages: [(&str, Breakage); 4] = [
            ("must have 1 to 3", |v| v["shape"]["box_rows"] = 0.into()),
            ("must have 1 to 3", |v| v["shape"]["box_cols"] = 7.into()),
            ("cells; a 4x4 grid has 16", |v| {
                v["solution"].as_array_mut().unwrap().pop();
            }),
            ("cells must be 0 to 4", |v| v["givens"][0] = 9.into()),
        ];
        for (expected, breakage) in breakages {
            let mut bad = task.clone();
            breakage(&mut bad.verification);
            for result in [
                Sudoku.reference(&bad).map(|_| ()),
                Sudoku.wrong_completions(&bad).map(|_| ()),
                Sudoku.score(&bad, "1234").map(|_| ()),
            ] {
                let err = result.unwrap_err().to_string();
                assert!(err.contains(expected), "{expected:?} not in {err:?}");
            }
        }
    }
}
