//! `game` (multi-turn): tic-tac-toe as X against a scripted O.
//!
//! The opponent is deterministic for a task: at each position it blunders (plays a move chosen
//! by a hash of the task's opponent seed and the board) with the level's blunder rate, and
//! otherwise plays perfectly. Because it is deterministic, the environment knows the best result
//! X can force against it, and the reward is measured against that: reaching it earns 1.0, a
//! draw where a win was possible 0.5, anything worse 0. An unreadable or illegal move ends the
//! game with 0. Level 0 is a position with a win in one move; level 1 a position from which X
//! can force a win; from level 2 short random openings against an opponent that blunders less
//! with each level until level 5, where it never does.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::chat::{Message, final_answer};
use crate::env::{Category, EnvInfo, Environment, Episode, StepOutcome, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task, stable_hash};
use crate::task::{Score, Split, Task};

const NAME: &str = "game";
const MAX_DIFFICULTY: u32 = 5;
const EMPTY: u8 = 0;
const X: u8 = 1;
const O: u8 = 2;
const LINES: [[usize; 3]; 8] = [
    [0, 1, 2],
    [3, 4, 5],
    [6, 7, 8],
    [0, 3, 6],
    [1, 4, 7],
    [2, 5, 8],
    [0, 4, 8],
    [2, 4, 6],
];

type Board = [u8; 9];

/// Tic-tac-toe against a scripted opponent.
#[derive(Debug, Clone, Default)]
pub struct Game;

#[derive(Debug, Serialize, Deserialize)]
struct Verification {
    start: Board,
    /// Chance, in thousandths, that the opponent blunders at a position.
    blunder_per_mille: u64,
    opponent_seed: u64,
    /// The best outcome X can force: 1 win, 0 draw.
    best: i8,
}

#[derive(Debug, Serialize, Deserialize)]
struct GameState {
    board: Board,
}

fn winner(board: &Board) -> Option<u8> {
    LINES
        .iter()
        .find(|line| board[line[0]] != EMPTY && line.iter().all(|&i| board[i] == board[line[0]]))
        .map(|line| board[line[0]])
}

fn empty_cells(board: &Board) -> Vec<usize> {
    (0..9).filter(|&i| board[i] == EMPTY).collect()
}

fn is_over(board: &Board) -> bool {
    winner(board).is_some() || empty_cells(board).is_empty()
}

/// The game value with `to_move` to play, from X's side: 1, 0 or -1, both playing perfectly.
fn minimax(board: &mut Board, to_move: u8) -> i8 {
    if let Some(w) = winner(board) {
        return if w == X { 1 } else { -1 };
    }
    let cells = empty_cells(board);
    if cells.is_empty() {
        return 0;
    }
    let values = cells.iter().map(|&cell| {
        board[cell] = to_move;
        let value = minimax(board, if to_move == X { O } else { X });
        board[cell] = EMPTY;
        value
    });
    if to_move == X {
        values.max().unwrap_or(0)
    } else {
        values.min().unwrap_or(0)
    }
}

/// The opponent's move on `board` (O to play, game not over).
fn opponent_move(board: &Board, expected: &Verification) -> Option<usize> {
    let cells = empty_cells(board);
    let hash = stable_hash(format!("{}:{board:?}", expected.opponent_seed).as_bytes());
    if hash % 1000 < expected.blunder_per_mille {
        return cells
            .get((hash / 1000) as usize % cells.len().max(1))
            .copied();
    }
    let mut scratch = *board;
    // Best for O = lowest value; ties go to the first cell, so the choice is reproducible.
    cells.into_iter().min_by_key(|&cell| {
        scratch[cell] = O;
        let value = minimax(&mut scratch, X);
        scratch[cell] = EMPTY;
        value
    })
}

/// Best outcome X can force against this opponent from `board` (X to move), and the move.
fn best_line(board: &Board, expected: &Verification) -> (i8, Option<usize>) {
    // Take a win at once when there is one, rather than a slower forced win.
    for cell in empty_cells(board) {
        let mut next = *board;
        next[cell] = X;
        if winner(&next) == Some(X) {
            return (1, Some(cell));
        }
    }
    let mut best: (i8, Option<usize>) = (-2, None);
    for cell in empty_cells(board) {
        let mut next = *board;
        next[cell] = X;
        let value = match outcome_after_x(&mut next, expected) {
            Some(value) => value,
            None => best_line(&next, expected).0,
        };
        if value > best.0 {
            best = (value, Some(cell));
        }
    }
    best
}

/// After X's move: the result if the game ended (after O's reply if any), else `None` with the
/// board advanced by O's reply.
fn outcome_after_x(board: &mut Board, expected: &Verification) -> Option<i8> {
    if winner(board) == Some(X) {
        return Some(1);
    }
    if empty_cells(board).is_empty() {
        return Some(0);
    }
    let reply = opponent_move(board, expected)?;
    board[reply] = O;
    if winner(board) == Some(O) {
        return Some(-1);
    }
    if empty_cells(board).is_empty() {
        return Some(0);
    }
    None
}

fn render(board: &Board) -> String {
    board
        .chunks(3)
        .enumerate()
        .map(|(row, cells)| {
            cells
                .iter()
                .enumerate()
                .map(|(col, &c)| match c {
                    X => 'X',
                    O => 'O',
                    _ => char::from(b'1' + (row * 3 + col) as u8),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reward for reaching `result` when `best` was possible.
fn reward_for(result: i8, best: i8) -> f64 {
    if result >= best {
        1.0
    } else if result == 0 {
        0.5
    } else {
        0.0
    }
}

fn result_words(result: i8) -> &'static str {
    match result {
        1 => "X wins",
        0 => "draw",
        _ => "O wins",
    }
}

/// A random position with X to move after `pairs` moves by each side, game not over.
fn random_opening(rng: &mut TaskRng, pairs: usize) -> Option<Board> {
    let mut board = [EMPTY; 9];
    for _ in 0..pairs {
        for player in [X, O] {
            let cells = empty_cells(&board);
            board[cells[rng.random_range(0..cells.len())]] = player;
            if is_over(&board) {
                return None;
            }
        }
    }
    Some(board)
}

/// Reads a move: one cell number 1-9, optionally as `cell 5` or `move 5.`; anything else is
/// not a move (a stray digit inside other text does not count).
fn parse_move(response: &str) -> Result<usize, String> {
    let answer = final_answer(response);
    let lower = answer.to_lowercase();
    let mut text = lower.trim();
    for word in ["cell", "move", "square"] {
        text = text.strip_prefix(word).unwrap_or(text).trim_start();
    }
    let text = text.trim_end_matches('.').trim();
    match text.parse::<usize>() {
        Ok(cell) if (1..=9).contains(&cell) && text.len() == 1 => Ok(cell - 1),
        _ => Err(format!("expected one cell number 1-9, got {answer:?}")),
    }
}

impl Game {
    /// Plays X's move from `board`; returns the finished game's score or the board after O's reply.
    fn play(
        board: &mut Board,
        response: &str,
        expected: &Verification,
    ) -> Result<Option<Score>, Score> {
        let cell = parse_move(response)
            .map_err(|reason| Score::zero(reason).with_component("legal", 0.0))?;
        if board[cell] != EMPTY {
            return Err(
                Score::zero(format!("cell {} is taken", cell + 1)).with_component("legal", 0.0)
            );
        }
        board[cell] = X;
        Ok(outcome_after_x(board, expected).map(|result| {
            Score {
                reward: reward_for(result, expected.best),
                components: Vec::new(),
                reason: format!(
                    "{}; best possible: {}",
                    result_words(result),
                    result_words(expected.best)
                ),
            }
            .with_component("legal", 1.0)
            .with_component("result", f64::from(result))
        }))
    }
}

fn prompt_text(board: &Board) -> String {
    format!("Tic-tac-toe, you are X.\n{}\nMove 1-9?", render(board))
}

fn load_board(task: &Task, episode: &Episode) -> Result<Board, EnvError> {
    serde_json::from_value::<GameState>(episode.state.clone())
        .map(|state| state.board)
        .map_err(|err| EnvError::BadEpisodeState {
            task_id: task.id.clone(),
            message: err.to_string(),
        })
}

impl Environment for Game {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::Game,
            turns: Turns::Multi,
            // X moves at most five times in a game.
            max_turns: 5,
            default_weight: 0.5,
            max_difficulty: MAX_DIFFICULTY,
            description: "Tic-tac-toe as X against a scripted opponent; reward relative to the best forcible result".into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let blunder_per_mille = match level {
            0..=2 => 1000,
            3 => 500,
            4 => 200,
            _ => 0,
        };
        let (key, verification) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let pairs = match level {
                0 => rng.random_range(2..=3),
                1 => rng.random_range(1..=3),
                2 => 2,
                _ => 1,
            };
            let start = random_opening(rng, pairs)?;
            let opponent_seed = rng.random::<u64>();
            let mut expected = Verification {
                start,
                blunder_per_mille,
                opponent_seed,
                best: 0,
            };
            expected.best = best_line(&start, &expected).0;
            let immediate_win = empty_cells(&start).into_iter().any(|cell| {
                let mut next = start;
                next[cell] = X;
                winner(&next) == Some(X)
            });
            let keep = match level {
                0 => immediate_win,
                1 => expected.best == 1 && !immediate_win,
                _ => expected.best >= 0,
            };
            keep.then(|| (prompt_text(&start), expected))
        })?;
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        let id_key = format!("{key}|{}", verification.opponent_seed);
        make_task(origin, &id_key, vec![Message::user(key)], &verification)
    }

    /// Scores a single move from the start position: full marks only if it ends the game with the
    /// best result (a win in one at level 0); longer games need [`Environment::step`].
    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        let mut board = expected.start;
        Ok(match Self::play(&mut board, &response, &expected) {
            Err(score) => score,
            Ok(Some(score)) => score,
            Ok(None) => Score::zero("the game is not over after one move; play it through step")
                .with_component("legal", 1.0),
        })
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        best_move_text(task, &expected.start, &expected)
    }

    fn start(&self, task: &Task) -> Result<Episode, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let state = serde_json::to_value(GameState {
            board: expected.start,
        })
        .map_err(|source| EnvError::Serialize {
            env: NAME.into(),
            source,
        })?;
        Ok(Episode::new(task, state))
    }

    fn step(
        &self,
        task: &Task,
        episode: &mut Episode,
        action: &str,
    ) -> Result<StepOutcome, EnvError> {
        self.check_task(task)?;
        if episode.done {
            return Err(EnvError::EpisodeFinished {
                task_id: task.id.clone(),
            });
        }
        let expected: Verification = task.verification_as()?;
        let mut board = load_board(task, episode)?;
        episode.messages.push(Message::assistant(action));
        episode.turn += 1;
        let outcome = match response_or_zero(action) {
            Err(zero) => StepOutcome {
                observation: None,
                done: true,
                score: Some(zero),
            },
            Ok(response) => match Self::play(&mut board, &response, &expected) {
                Err(score) | Ok(Some(score)) => StepOutcome {
                    observation: None,
                    done: true,
                    score: Some(score),
                },
                Ok(None) => {
                    let reply = Message::user(format!("{}\nMove 1-9?", render(&board)));
                    StepOutcome {
                        observation: Some(reply),
                        done: false,
                        score: None,
                    }
                }
            },
        };
        if let Some(observation) = &outcome.observation {
            episode.messages.push(observation.clone());
        }
        episode.done = outcome.done;
        episode.state =
            serde_json::to_value(GameState { board }).map_err(|source| EnvError::Serialize {
                env: NAME.into(),
                source,
            })?;
        Ok(outcome)
    }

    fn reference_action(&self, task: &Task, episode: &Episode) -> Result<String, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        best_move_text(task, &load_board(task, episode)?, &expected)
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let expected: Verification = task.verification_as()?;
        let taken = (0..9)
            .find(|&i| expected.start[i] != EMPTY)
            .map(|i| (i + 1).to_string())
            .unwrap_or_default();
        Ok(vec![taken, "0".into(), "5 or 6".into()])
    }
}

fn best_move_text(task: &Task, board: &Board, expected: &Verification) -> Result<String, EnvError> {
    best_line(board, expected)
        .1
        .map(|cell| (cell + 1).to_string())
        .ok_or_else(|| EnvError::NoReference {
            env: NAME.into(),
            task_id: task.id.clone(),
            reason: "no legal move".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;
    use crate::check::run_reference_episode;

    #[test]
    fn self_check_passes() {
        assert_self_check_passes(&Game, &[0, 1, 2, 3, 5], 8);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&Game, 0, 100);
        assert_splits_disjoint(&Game, 4, 100);
    }

    #[test]
    fn perfect_play_draws_from_the_empty_board() {
        assert_eq!(minimax(&mut [EMPTY; 9], X), 0);
    }

    #[test]
    fn level_zero_is_won_in_one_move_and_scores_as_single_turn() {
        for seed in 0..10 {
            let task = train_task(&Game, seed, 0);
            let reference = Game.reference(&task).unwrap();
            assert!(Game.score(&task, &reference).unwrap().is_full());
        }
    }

    #[test]
    fn a_full_game_against_the_perfect_opponent_is_a_draw_at_best() {
        let task = train_task(&Game, 3, 5);
        let expected: Verification = task.verification_as().unwrap();
        let score = run_reference_episode(&Game, &task).unwrap();
        assert!(score.is_full());
        assert_eq!(score.component("result"), Some(f64::from(expected.best)));
    }

    #[test]
    fn bad_moves_end_the_game_with_zero() {
        let task = train_task(&Game, 1, 2);
        let taken = Game.wrong_completions(&task).unwrap()[0].clone();
        let mut episode = Game.start(&task).unwrap();
        let outcome = Game.step(&task, &mut episode, &taken).unwrap();
        assert!(outcome.done);
        assert!(outcome.score.unwrap().reason.contains("taken"));
        assert!(Game.step(&task, &mut episode, "1").is_err());
    }

    #[test]
    fn moves_are_read_strictly() {
        assert_eq!(parse_move("5"), Ok(4));
        assert_eq!(parse_move("Cell 5."), Ok(4));
        assert!(parse_move("5 or 6").is_err());
        assert!(parse_move("I like 5").is_err());
        assert!(parse_move("0").is_err());
        assert!(parse_move("55").is_err());
    }

    #[test]
    fn rewards_are_relative_to_the_best_result() {
        assert_eq!(reward_for(1, 1), 1.0);
        assert_eq!(reward_for(0, 1), 0.5);
        assert_eq!(reward_for(0, 0), 1.0);
        assert_eq!(reward_for(-1, 0), 0.0);
    }
}
