//! `sql`: text-to-SQL over a generated SQLite database.
//!
//! Each task generates a small database from one of several domains (pets and their vet visits,
//! customers and orders, students and exams…): a parent table with a unique name column, a
//! category column, an integer and a real measure, and from level 4 a child table referring to
//! it. A question comes from a template with a gold query; the model answers with one SQLite
//! query (plain, or in a fenced code block). Scoring runs the gold and the predicted query in the
//! sandbox with Python's built-in `sqlite3` (`sql/run_sql.py`): the script builds the database in
//! the sandbox's private directory, then runs each query on a read-only connection (URI
//! `mode=ro`, an authorizer that allows only reading, a progress handler that interrupts it after
//! [`QUERY_LIMIT_MS`]) and prints both result sets as JSON. The result sets are compared row by
//! row: as multisets unless the question asks for an order (its gold query has `ORDER BY`);
//! integers exactly, other numbers with a relative tolerance of 1e-9; column names are ignored,
//! the number of columns is not.
//!
//! Levels: 0, one two-column table and a one-condition filter or a lookup; 1, category filters,
//! ranges and counts; 2, aggregates, two conditions, `DISTINCT`, real numbers; 3, `GROUP BY` and
//! `HAVING`; 4, joins; 5, ordering and `LIMIT` (ordered comparison); 6, subqueries and
//! anti-joins. Thresholds are taken from the data, so every gold result is non-empty, and
//! ordered questions order by columns without ties.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::script::{Runner, Script, run_in_sandbox};
use crate::chat::{Message, extract_code, final_answer};
use crate::env::{Category, EnvInfo, Environment, Turns, response_or_zero};
use crate::error::EnvError;
use crate::sampling::{TaskOrigin, TaskRng, draw_in_split, make_task};
use crate::sandbox::Limits;
use crate::task::{Score, Split, Task};

const NAME: &str = "sql";
const MAX_DIFFICULTY: u32 = 6;
/// How long the predicted query may run.
pub const QUERY_LIMIT_MS: u64 = 2_000;
/// How long the gold query may run (it is ours and small; this only bounds a broken machine).
const GOLD_LIMIT_MS: u64 = 5_000;
/// The script that builds the database and runs the queries inside the sandbox.
const RUNNER: Script = Script {
    path: "run_sql.py",
    source: include_str!("sql/run_sql.py"),
};
/// Relative tolerance for comparing non-integer numbers.
const RELATIVE_TOLERANCE: f64 = 1e-9;

/// Text-to-SQL over generated SQLite databases, checked by executing both queries.
#[derive(Debug, Clone, Default)]
pub struct Sql;

/// One schema family: a parent table and a child table referring to it.
struct Domain {
    parent: &'static str,
    one: &'static str,
    name_col: &'static str,
    names: &'static [&'static str],
    cat_col: &'static str,
    cats: &'static [&'static str],
    num_col: &'static str,
    num_range: (i64, i64),
    real_col: &'static str,
    /// In tenths.
    real_range: (i64, i64),
    child: &'static str,
    child_one: &'static str,
    fk: &'static str,
    child_cat_col: &'static str,
    child_cats: &'static [&'static str],
    amount_col: &'static str,
    amount_range: (i64, i64),
}

const PEOPLE: &[&str] = &[
    "Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Keiko",
    "Liam", "Maya", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara",
];

const DOMAINS: [Domain; 8] = [
    Domain {
        parent: "pets",
        one: "pet",
        name_col: "name",
        names: &[
            "Rex", "Tom", "Bella", "Max", "Luna", "Coco", "Milo", "Daisy", "Oscar", "Ruby", "Leo",
            "Nala", "Toby", "Pip", "Zoe", "Otto",
        ],
        cat_col: "species",
        cats: &["cat", "dog", "bird", "fish"],
        num_col: "age",
        num_range: (1, 40),
        real_col: "weight",
        real_range: (5, 400),
        child: "visits",
        child_one: "visit",
        fk: "pet_id",
        child_cat_col: "clinic",
        child_cats: &["North", "South", "East"],
        amount_col: "cost",
        amount_range: (20, 300),
    },
    Domain {
        parent: "customers",
        one: "customer",
        name_col: "name",
        names: PEOPLE,
        cat_col: "city",
        cats: &["Paris", "Oslo", "Lima", "Rome"],
        num_col: "age",
        num_range: (18, 80),
        real_col: "balance",
        real_range: (0, 9999),
        child: "orders",
        child_one: "order",
        fk: "customer_id",
        child_cat_col: "product",
        child_cats: &["pen", "lamp", "desk", "mug"],
        amount_col: "quantity",
        amount_range: (1, 60),
    },
    Domain {
        parent: "students",
        one: "student",
        name_col: "name",
        names: PEOPLE,
        cat_col: "house",
        cats: &["red", "blue", "green", "gold"],
        num_col: "score",
        num_range: (40, 100),
        real_col: "height",
        real_range: (1400, 1950),
        child: "exams",
        child_one: "exam",
        fk: "student_id",
        child_cat_col: "subject",
        child_cats: &["math", "art", "music", "history"],
        amount_col: "mark",
        amount_range: (1, 100),
    },
    Domain {
        parent: "books",
        one: "book",
        name_col: "title",
        names: &[
            "Dune",
            "Emma",
            "Ulysses",
            "Beloved",
            "Hamlet",
            "Rebecca",
            "Matilda",
            "Walden",
            "Ivanhoe",
            "Persuasion",
            "Kim",
            "Lolita",
            "Middlemarch",
            "Heidi",
            "Candide",
            "Dracula",
        ],
        cat_col: "genre",
        cats: &["novel", "drama", "poetry", "essay"],
        num_col: "pages",
        num_range: (80, 900),
        real_col: "price",
        real_range: (50, 450),
        child: "loans",
        child_one: "loan",
        fk: "book_id",
        child_cat_col: "member",
        child_cats: &["Ada", "Bo", "Cy", "Di"],
        amount_col: "days",
        amount_range: (1, 60),
    },
    Domain {
        parent: "employees",
        one: "employee",
        name_col: "name",
        names: PEOPLE,
        cat_col: "team",
        cats: &["sales", "ops", "design", "legal"],
        num_col: "salary",
        num_range: (300, 1200),
        real_col: "rating",
        real_range: (10, 50),
        child: "shifts",
        child_one: "shift",
        fk: "employee_id",
        child_cat_col: "site",
        child_cats: &["depot", "office", "store"],
        amount_col: "hours",
        amount_range: (1, 60),
    },
    Domain {
        parent: "cities",
        one: "city",
        name_col: "name",
        names: &[
            "Avila", "Bergen", "Cork", "Dijon", "Essen", "Faro", "Graz", "Hilo", "Izmir", "Jena",
            "Kobe", "Lyon", "Malmo", "Nice", "Oulu", "Pisa",
        ],
        cat_col: "country",
        cats: &["Spain", "Norway", "France", "Japan"],
        num_col: "population",
        num_range: (10, 999),
        real_col: "area",
        real_range: (100, 9000),
        child: "trips",
        child_one: "trip",
        fk: "city_id",
        child_cat_col: "mode",
        child_cats: &["bus", "train", "car", "plane"],
        amount_col: "cost",
        amount_range: (5, 500),
    },
    Domain {
        parent: "players",
        one: "player",
        name_col: "name",
        names: PEOPLE,
        cat_col: "club",
        cats: &["Lions", "Hawks", "Bears", "Wolves"],
        num_col: "goals",
        num_range: (0, 60),
        real_col: "height",
        real_range: (1600, 2100),
        child: "matches",
        child_one: "match",
        fk: "player_id",
        child_cat_col: "venue",
        child_cats: &["home", "away", "neutral"],
        amount_col: "minutes",
        amount_range: (1, 90),
    },
    Domain {
        parent: "plants",
        one: "plant",
        name_col: "name",
        names: &[
            "fern", "ivy", "mint", "basil", "sage", "aloe", "tulip", "rose", "lily", "iris",
            "lotus", "poppy", "daisy", "thyme", "cactus", "orchid",
        ],
        cat_col: "color",
        cats: &["green", "red", "white", "yellow"],
        num_col: "height",
        num_range: (5, 200),
        real_col: "price",
        real_range: (10, 500),
        child: "waterings",
        child_one: "watering",
        fk: "plant_id",
        child_cat_col: "gardener",
        child_cats: &["Kai", "Lea", "Mo"],
        amount_col: "liters",
        amount_range: (1, 90),
    },
];

/// One table of the generated database, as the runner script builds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Table {
    name: String,
    ddl: String,
    columns: Vec<String>,
    /// Short schema line for the prompt, `pets(name TEXT, age INTEGER)`.
    schema: String,
    rows: Vec<Vec<Value>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Verification {
    tables: Vec<Table>,
    question: String,
    gold: String,
    /// Whether row order matters (the question asks for one).
    ordered: bool,
}

#[derive(Debug, Clone)]
struct Parent {
    id: i64,
    name: String,
    cat: String,
    num: i64,
    /// In tenths.
    real: i64,
}

#[derive(Debug, Clone)]
struct Child {
    id: i64,
    parent: i64,
    cat: String,
    amount: i64,
}

struct Db<'d> {
    domain: &'d Domain,
    parents: Vec<Parent>,
    children: Vec<Child>,
}

/// `count` distinct values from `lo..=hi`, in random order.
fn distinct_values(rng: &mut TaskRng, lo: i64, hi: i64, count: usize) -> Vec<i64> {
    let mut all: Vec<i64> = (lo..=hi).collect();
    all.shuffle(rng);
    all.truncate(count);
    all
}

fn generate<'d>(rng: &mut TaskRng, domain: &'d Domain, level: u32) -> Db<'d> {
    let parents_n = match level {
        0 => rng.random_range(4..=6),
        1 | 2 => rng.random_range(6..=9),
        _ => rng.random_range(7..=11),
    };
    let mut names: Vec<&str> = domain.names.to_vec();
    names.shuffle(rng);
    let cats_used = if level < 3 {
        3
    } else {
        domain.cats.len().min(4)
    };
    let mut cats: Vec<&str> = domain.cats.to_vec();
    cats.shuffle(rng);
    cats.truncate(cats_used);
    let nums = distinct_values(rng, domain.num_range.0, domain.num_range.1, parents_n);
    let reals = distinct_values(rng, domain.real_range.0, domain.real_range.1, parents_n);
    let parents: Vec<Parent> = (0..parents_n)
        .map(|i| Parent {
            id: i as i64 + 1,
            name: names[i % names.len()].to_string(),
            cat: cats.choose(rng).copied().unwrap_or("x").to_string(),
            num: nums[i],
            real: reals[i],
        })
        .collect();
    let mut children = Vec::new();
    if level >= 4 {
        let children_n = rng.random_range(parents_n..=parents_n * 2);
        let amounts = distinct_values(
            rng,
            domain.amount_range.0,
            domain.amount_range.1,
            children_n,
        );
        // Leave one or two parents without children, for the anti-join questions.
        let childless = rng.random_range(1..=2);
        let with_children = parents_n - childless;
        for (i, amount) in amounts.into_iter().enumerate() {
            children.push(Child {
                id: i as i64 + 1,
                parent: rng.random_range(1..=with_children as i64),
                cat: domain
                    .child_cats
                    .choose(rng)
                    .copied()
                    .unwrap_or("x")
                    .to_string(),
                amount,
            });
        }
    }
    Db {
        domain,
        parents,
        children,
    }
}

fn real_value(tenths: i64) -> Value {
    serde_json::json!(tenths as f64 / 10.0)
}

fn real_text(tenths: i64) -> String {
    format!("{}.{}", tenths / 10, tenths % 10)
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl Db<'_> {
    fn tables(&self, level: u32) -> Vec<Table> {
        let d = self.domain;
        let mut parent_cols: Vec<(&str, &str)> = Vec::new();
        if level >= 1 {
            parent_cols.push(("id", "INTEGER"));
        }
        parent_cols.push((d.name_col, "TEXT"));
        if level >= 1 {
            parent_cols.push((d.cat_col, "TEXT"));
        }
        parent_cols.push((d.num_col, "INTEGER"));
        if level >= 2 {
            parent_cols.push((d.real_col, "REAL"));
        }
        let rows = self
            .parents
            .iter()
            .map(|p| {
                parent_cols
                    .iter()
                    .map(|(col, _)| match *col {
                        "id" => serde_json::json!(p.id),
                        c if c == d.name_col => serde_json::json!(p.name),
                        c if c == d.cat_col => serde_json::json!(p.cat),
                        c if c == d.num_col => serde_json::json!(p.num),
                        _ => real_value(p.real),
                    })
                    .collect()
            })
            .collect();
        let mut tables = vec![table(d.parent, &parent_cols, rows)];
        if level >= 4 {
            let child_cols = [
                ("id", "INTEGER"),
                (d.fk, "INTEGER"),
                (d.child_cat_col, "TEXT"),
                (d.amount_col, "INTEGER"),
            ];
            let rows = self
                .children
                .iter()
                .map(|c| {
                    vec![
                        serde_json::json!(c.id),
                        serde_json::json!(c.parent),
                        serde_json::json!(c.cat),
                        serde_json::json!(c.amount),
                    ]
                })
                .collect();
            tables.push(table(d.child, &child_cols, rows));
        }
        tables
    }

    fn sorted_nums(&self) -> Vec<i64> {
        let mut nums: Vec<i64> = self.parents.iter().map(|p| p.num).collect();
        nums.sort_unstable();
        nums
    }

    fn cat_counts(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for p in &self.parents {
            *counts.entry(p.cat.as_str()).or_default() += 1;
        }
        counts
    }

    fn children_of(&self, parent: i64) -> impl Iterator<Item = &Child> {
        self.children.iter().filter(move |c| c.parent == parent)
    }
}

fn table(name: &str, cols: &[(&str, &str)], rows: Vec<Vec<Value>>) -> Table {
    let body = cols
        .iter()
        .map(|(c, t)| format!("{c} {t}"))
        .collect::<Vec<_>>()
        .join(", ");
    Table {
        name: name.to_string(),
        ddl: format!("CREATE TABLE {name}({body})"),
        columns: cols.iter().map(|(c, _)| c.to_string()).collect(),
        schema: format!("{name}({body})"),
        rows,
    }
}

/// A question with its gold query.
struct Question {
    text: String,
    gold: String,
    ordered: bool,
}

fn q(text: String, gold: String) -> Option<Question> {
    Some(Question {
        text,
        gold,
        ordered: false,
    })
}

fn ordered(text: String, gold: String) -> Option<Question> {
    Some(Question {
        text,
        gold,
        ordered: true,
    })
}

/// A threshold strictly inside the data: some values above it and some not.
fn inner_threshold(rng: &mut TaskRng, sorted: &[i64]) -> Option<i64> {
    if sorted.len() < 2 {
        return None;
    }
    Some(sorted[rng.random_range(0..sorted.len() - 1)])
}

fn question(rng: &mut TaskRng, db: &Db<'_>, level: u32) -> Option<Question> {
    let d = db.domain;
    let (p, n, c, x, r) = (d.parent, d.name_col, d.cat_col, d.num_col, d.real_col);
    let (k, f, dc, a) = (d.child, d.fk, d.child_cat_col, d.amount_col);
    let sorted = db.sorted_nums();
    let some_parent = db.parents.choose(rng)?.clone();
    let some_cat = some_parent.cat.clone();
    match level {
        0 => match rng.random_range(0..3) {
            0 => {
                let v = inner_threshold(rng, &sorted)?;
                q(
                    format!("List the {n} of {p} with {x} greater than {v}."),
                    format!("SELECT {n} FROM {p} WHERE {x} > {v}"),
                )
            }
            1 => {
                let v = sorted[rng.random_range(1..sorted.len())];
                q(
                    format!("List the {n} of {p} with {x} less than {v}."),
                    format!("SELECT {n} FROM {p} WHERE {x} < {v}"),
                )
            }
            _ => q(
                format!("What is the {x} of {}?", some_parent.name),
                format!(
                    "SELECT {x} FROM {p} WHERE {n} = {}",
                    quote(&some_parent.name)
                ),
            ),
        },
        1 => match rng.random_range(0..4) {
            0 => q(
                format!("List the {n} of {p} whose {c} is '{some_cat}'."),
                format!("SELECT {n} FROM {p} WHERE {c} = {}", quote(&some_cat)),
            ),
            1 => {
                let lo = rng.random_range(0..sorted.len() - 1);
                let hi = rng.random_range(lo + 1..sorted.len());
                q(
                    format!(
                        "List the {n} of {p} with {x} between {} and {} inclusive.",
                        sorted[lo], sorted[hi]
                    ),
                    format!(
                        "SELECT {n} FROM {p} WHERE {x} BETWEEN {} AND {}",
                        sorted[lo], sorted[hi]
                    ),
                )
            }
            2 => q(
                format!("How many {p} have {c} '{some_cat}'?"),
                format!("SELECT COUNT(*) FROM {p} WHERE {c} = {}", quote(&some_cat)),
            ),
            _ => {
                let v = inner_threshold(rng, &sorted)?;
                q(
                    format!("How many {p} have {x} greater than {v}?"),
                    format!("SELECT COUNT(*) FROM {p} WHERE {x} > {v}"),
                )
            }
        },
        2 => match rng.random_range(0..5) {
            0 => {
                let (word, func) = *[
                    ("total", "SUM"),
                    ("average", "AVG"),
                    ("smallest", "MIN"),
                    ("largest", "MAX"),
                ]
                .choose(rng)?;
                q(
                    format!("What is the {word} {x} of {p} whose {c} is '{some_cat}'?"),
                    format!(
                        "SELECT {func}({x}) FROM {p} WHERE {c} = {}",
                        quote(&some_cat)
                    ),
                )
            }
            1 => {
                let matching: Vec<i64> = db
                    .parents
                    .iter()
                    .filter(|pp| pp.cat == some_cat)
                    .map(|pp| pp.num)
                    .collect();
                let mut matching = matching;
                matching.sort_unstable();
                // Drop the lowest matches at least, so the second condition matters.
                let v = if matching.len() >= 2 {
                    matching[rng.random_range(0..matching.len() - 1)]
                } else {
                    matching.first()? - 1
                };
                q(
                    format!(
                        "List the {n} of {p} whose {c} is '{some_cat}' and whose {x} is above {v}."
                    ),
                    format!(
                        "SELECT {n} FROM {p} WHERE {c} = {} AND {x} > {v}",
                        quote(&some_cat)
                    ),
                )
            }
            2 => {
                let mut reals: Vec<i64> = db.parents.iter().map(|pp| pp.real).collect();
                reals.sort_unstable();
                let v = reals[rng.random_range(1..reals.len())];
                q(
                    format!(
                        "List the {n} and {x} of {p} with {r} below {}.",
                        real_text(v)
                    ),
                    format!("SELECT {n}, {x} FROM {p} WHERE {r} < {}", real_text(v)),
                )
            }
            3 => q(
                format!("List the different values of {c} in {p}, each once."),
                format!("SELECT DISTINCT {c} FROM {p}"),
            ),
            _ => q(
                format!("What is the average {r} of all {p}?"),
                format!("SELECT AVG({r}) FROM {p}"),
            ),
        },
        3 => match rng.random_range(0..3) {
            0 => q(
                format!("For each {c}, how many {p} are there? Give the {c} and the count."),
                format!("SELECT {c}, COUNT(*) FROM {p} GROUP BY {c}"),
            ),
            1 => {
                let (word, func) = *[
                    ("total", "SUM"),
                    ("smallest", "MIN"),
                    ("largest", "MAX"),
                    ("average", "AVG"),
                ]
                .choose(rng)?;
                q(
                    format!("For each {c}, give the {c} and the {word} {x} of its {p}."),
                    format!("SELECT {c}, {func}({x}) FROM {p} GROUP BY {c}"),
                )
            }
            _ => {
                let counts: BTreeSet<usize> = db.cat_counts().values().copied().collect();
                // A bound some groups exceed and some do not.
                let bounds: Vec<usize> = counts.iter().copied().rev().skip(1).collect();
                let bound = *bounds.choose(rng)?;
                q(
                    format!("Which values of {c} have more than {bound} {p}?"),
                    format!("SELECT {c} FROM {p} GROUP BY {c} HAVING COUNT(*) > {bound}"),
                )
            }
        },
        4 => {
            let with_children: Vec<&Parent> = db
                .parents
                .iter()
                .filter(|pp| db.children_of(pp.id).next().is_some())
                .collect();
            let owner = *with_children.choose(rng)?;
            match rng.random_range(0..4) {
                0 => {
                    let child_cat = db.children.choose(rng)?.cat.clone();
                    q(
                        format!(
                            "List, without duplicates, the {n} of {p} that have a {} with {dc} '{child_cat}'.",
                            d.child_one
                        ),
                        format!(
                            "SELECT DISTINCT {p}.{n} FROM {p} JOIN {k} ON {k}.{f} = {p}.id WHERE {k}.{dc} = {}",
                            quote(&child_cat)
                        ),
                    )
                }
                1 => q(
                    format!("What is the total {a} of the {k} of {}?", owner.name),
                    format!(
                        "SELECT SUM({k}.{a}) FROM {k} JOIN {p} ON {k}.{f} = {p}.id WHERE {p}.{n} = {}",
                        quote(&owner.name)
                    ),
                ),
                2 => q(
                    format!("How many {k} belong to {p} whose {c} is '{}'?", owner.cat),
                    format!(
                        "SELECT COUNT(*) FROM {k} JOIN {p} ON {k}.{f} = {p}.id WHERE {p}.{c} = {}",
                        quote(&owner.cat)
                    ),
                ),
                _ => q(
                    format!(
                        "For each {} that has {k}, give its {n} and the number of its {k}.",
                        d.one
                    ),
                    format!(
                        "SELECT {p}.{n}, COUNT(*) FROM {p} JOIN {k} ON {k}.{f} = {p}.id GROUP BY {p}.id"
                    ),
                ),
            }
        }
        5 => match rng.random_range(0..4) {
            0 => {
                let top = rng.random_range(2..=3);
                ordered(
                    format!("List the {n} of the {top} {p} with the highest {x}, highest first."),
                    format!("SELECT {n} FROM {p} ORDER BY {x} DESC LIMIT {top}"),
                )
            }
            1 => ordered(
                format!("List the {n} and {x} of all {p}, ordered by {x} from lowest to highest."),
                format!("SELECT {n}, {x} FROM {p} ORDER BY {x} ASC"),
            ),
            2 => {
                let mut totals: BTreeMap<i64, i64> = BTreeMap::new();
                for child in &db.children {
                    *totals.entry(child.parent).or_default() += child.amount;
                }
                let best = *totals.values().max()?;
                if totals.len() < 2 || totals.values().filter(|&&t| t == best).count() != 1 {
                    return None;
                }
                ordered(
                    format!(
                        "Which {} has the largest total {a} over its {k}? Give its {n}.",
                        d.one
                    ),
                    format!(
                        "SELECT {p}.{n} FROM {p} JOIN {k} ON {k}.{f} = {p}.id GROUP BY {p}.id ORDER BY SUM({k}.{a}) DESC LIMIT 1"
                    ),
                )
            }
            _ => {
                let owner = db
                    .parents
                    .iter()
                    .filter(|pp| db.children_of(pp.id).count() >= 2)
                    .collect::<Vec<_>>()
                    .choose(rng)
                    .copied()?;
                ordered(
                    format!(
                        "List the {a} of each of the {k} of {}, largest first.",
                        owner.name
                    ),
                    format!(
                        "SELECT {k}.{a} FROM {k} JOIN {p} ON {k}.{f} = {p}.id WHERE {p}.{n} = {} ORDER BY {k}.{a} DESC",
                        quote(&owner.name)
                    ),
                )
            }
        },
        _ => match rng.random_range(0..3) {
            0 => q(
                format!("List the {n} of {p} whose {x} is above the average {x} of all {p}."),
                format!("SELECT {n} FROM {p} WHERE {x} > (SELECT AVG({x}) FROM {p})"),
            ),
            1 => q(
                format!("List the {n} of {p} that have no {k}."),
                format!("SELECT {n} FROM {p} WHERE id NOT IN (SELECT {f} FROM {k})"),
            ),
            _ => {
                let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
                for child in &db.children {
                    *counts.entry(child.parent).or_default() += 1;
                }
                let distinct: BTreeSet<usize> = counts.values().copied().collect();
                // A bound that at least two parents exceed (so the order is visible) and some
                // parent does not.
                let bounds: Vec<usize> = distinct
                    .iter()
                    .copied()
                    .filter(|&b| counts.values().filter(|&&c| c > b).count() >= 2)
                    .collect();
                let bound = *bounds.choose(rng)?;
                ordered(
                    format!(
                        "List the {n} of {p} with more than {bound} {k}, in alphabetical order."
                    ),
                    format!(
                        "SELECT {p}.{n} FROM {p} JOIN {k} ON {k}.{f} = {p}.id GROUP BY {p}.id HAVING COUNT(*) > {bound} ORDER BY {p}.{n}"
                    ),
                )
            }
        },
    }
}

fn prompt_text(tables: &[Table], question: &str, level: u32) -> String {
    if level == 0 {
        format!(
            "Table {}\n{question}\nWrite one SQL query.",
            tables.first().map(|t| t.schema.as_str()).unwrap_or("")
        )
    } else {
        let schema: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
        format!(
            "SQLite tables:\n{}\nQuestion: {question}\nAnswer with one SQL query.",
            schema.join("\n")
        )
    }
}

/// The SQL in a response: the last fenced code block if there is a fence ([`extract_code`]),
/// else the final answer ([`final_answer`]: `<answer>` tags and the like, or the whole
/// response); without an `SQL:` label, and starting at the first line that begins with
/// `SELECT` or `WITH` when prose comes first.
fn extract_sql(response: &str) -> String {
    let extracted = if response.contains("```") {
        extract_code(response).unwrap_or_default()
    } else {
        final_answer(response).to_string()
    };
    let mut text = extracted.trim();
    for label in ["SQL:", "sql:", "Query:", "query:"] {
        if let Some(rest) = text.strip_prefix(label) {
            text = rest.trim();
        }
    }
    let starts_query = |line: &str| {
        let head: String = line
            .trim_start()
            .chars()
            .take(7)
            .collect::<String>()
            .to_ascii_lowercase();
        head.starts_with("select") || head.starts_with("with ")
    };
    if !starts_query(text) {
        let mut offset = 0;
        for line in text.split_inclusive('\n') {
            if starts_query(line) {
                text = text[offset..].trim();
                break;
            }
            offset += line.len();
        }
    }
    text.to_string()
}

/// One query's result as the runner reports it.
#[derive(Debug, Deserialize)]
struct QueryResult {
    ok: bool,
    #[serde(default)]
    error: String,
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default)]
    rows: Vec<Vec<Value>>,
    #[serde(default)]
    truncated: bool,
}

#[derive(Debug, Deserialize)]
struct Report {
    gold: QueryResult,
    predicted: QueryResult,
}

/// Runs the gold and the predicted query; `Err` says why nothing could be compared (the sandbox
/// failed or the run hit a limit).
fn execute(verification: &Verification, predicted: &str, runner: Runner) -> Result<Report, String> {
    let input = serde_json::json!({
        "tables": verification.tables,
        "gold": verification.gold,
        "predicted": predicted,
        "limit_ms": QUERY_LIMIT_MS,
        "gold_limit_ms": GOLD_LIMIT_MS,
    });
    let request = RUNNER.request(
        Vec::new(),
        Vec::new(),
        input.to_string().into_bytes(),
        Limits {
            cpu_time: Duration::from_secs(6),
            wall_time: Duration::from_secs(12),
            memory_bytes: 512 << 20,
            max_output_bytes: 4 << 20,
            ..Limits::default()
        },
    );
    let outcome = runner(&request)?;
    if !outcome.success() {
        return Err(format!("the query run {}", outcome.reason()));
    }
    serde_json::from_slice(&outcome.stdout)
        .map_err(|err| format!("the query runner's output is not readable: {err}"))
}

fn values_equal(gold: &Value, given: &Value) -> bool {
    match (gold, given) {
        (Value::Number(a), Value::Number(b)) => {
            if let (Some(a), Some(b)) = (a.as_i64(), b.as_i64()) {
                return a == b;
            }
            match (a.as_f64(), b.as_f64()) {
                (Some(a), Some(b)) => {
                    (a - b).abs() <= RELATIVE_TOLERANCE * a.abs().max(b.abs()).max(1.0)
                }
                _ => false,
            }
        }
        _ => gold == given,
    }
}

fn rows_equal(gold: &[Value], given: &[Value]) -> bool {
    gold.len() == given.len() && gold.iter().zip(given).all(|(a, b)| values_equal(a, b))
}

fn show_row(row: &[Value]) -> String {
    let text = serde_json::to_string(row).unwrap_or_default();
    if text.chars().count() > 80 {
        format!("{}…", text.chars().take(80).collect::<String>())
    } else {
        text
    }
}

/// `Ok` when the predicted rows match the gold rows, else what differs.
fn compare(gold: &QueryResult, given: &QueryResult, ordered: bool) -> Result<(), String> {
    let gold_width = gold.columns.len();
    if given.columns.len() != gold_width {
        return Err(format!(
            "{} column(s), expected {gold_width}",
            given.columns.len()
        ));
    }
    if given.truncated || given.rows.len() != gold.rows.len() {
        let count = if given.truncated {
            format!("more than {}", given.rows.len())
        } else {
            given.rows.len().to_string()
        };
        return Err(format!("{count} row(s), expected {}", gold.rows.len()));
    }
    if ordered {
        for (index, (want, got)) in gold.rows.iter().zip(&given.rows).enumerate() {
            if !rows_equal(want, got) {
                return Err(format!(
                    "row {} is {}, expected {} (the question asks for an order)",
                    index + 1,
                    show_row(got),
                    show_row(want)
                ));
            }
        }
        return Ok(());
    }
    let mut unmatched: Vec<&Vec<Value>> = given.rows.iter().collect();
    for want in &gold.rows {
        match unmatched.iter().position(|got| rows_equal(want, got)) {
            Some(found) => {
                unmatched.swap_remove(found);
            }
            None => return Err(format!("row {} is missing", show_row(want))),
        }
    }
    Ok(())
}

fn score_sql(
    task: &Task,
    verification: &Verification,
    sql: &str,
    runner: Runner,
) -> Result<Score, EnvError> {
    if sql.is_empty() {
        return Ok(Score::zero("no SQL query in the answer").with_component("executes", 0.0));
    }
    let report = match execute(verification, sql, runner) {
        Ok(report) => report,
        Err(why) => return Ok(Score::zero(why).with_component("executes", 0.0)),
    };
    if !report.gold.ok {
        return Err(task.invalid_verification(format!(
            "the gold query `{}` fails: {}",
            verification.gold, report.gold.error
        )));
    }
    if !report.predicted.ok {
        return Ok(
            Score::zero(format!("the query fails: {}", report.predicted.error))
                .with_component("executes", 0.0),
        );
    }
    let width_ok = report.predicted.columns.len() == report.gold.columns.len();
    let count_ok =
        !report.predicted.truncated && report.predicted.rows.len() == report.gold.rows.len();
    let score = match compare(&report.gold, &report.predicted, verification.ordered) {
        Ok(()) => Score::full(format!(
            "the result matches the gold query's ({} row(s){})",
            report.gold.rows.len(),
            if verification.ordered {
                ", in order"
            } else {
                ""
            }
        )),
        Err(why) => Score::zero(format!("wrong result: {why}")),
    };
    let correct = score.is_full();
    Ok(score
        .with_component("executes", 1.0)
        .with_component("columns", if width_ok { 1.0 } else { 0.0 })
        .with_component("rows", if count_ok { 1.0 } else { 0.0 })
        .with_component("result", if correct { 1.0 } else { 0.0 }))
}

impl Environment for Sql {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: NAME.into(),
            category: Category::Data,
            turns: Turns::Single,
            max_turns: 1,
            default_weight: 1.0,
            max_difficulty: MAX_DIFFICULTY,
            description: "Text-to-SQL over a generated SQLite database; the query runs read-only in the sandbox and its result set is compared with the gold query's".into(),
        }
    }

    fn sample(&self, seed: u64, split: Split, difficulty: u32) -> Result<Task, EnvError> {
        let level = difficulty.min(MAX_DIFFICULTY);
        let (key, verification) = draw_in_split(NAME, seed, split, difficulty, |rng| {
            let domain = DOMAINS.choose(rng)?;
            let db = generate(rng, domain, level);
            let question = question(rng, &db, level)?;
            let tables = db.tables(level);
            let prompt = prompt_text(&tables, &question.text, level);
            Some((
                prompt,
                Verification {
                    tables,
                    question: question.text,
                    gold: question.gold,
                    ordered: question.ordered,
                },
            ))
        })?;
        let origin = TaskOrigin {
            env: NAME,
            seed,
            split,
            difficulty,
        };
        // The id also covers the rows: two tasks may ask the same question of different data.
        let rows = serde_json::to_string(&verification.tables).unwrap_or_default();
        make_task(
            origin,
            &format!("{key}|{rows}"),
            vec![Message::user(key)],
            &verification,
        )
    }

    fn score(&self, task: &Task, completion: &str) -> Result<Score, EnvError> {
        self.check_task(task)?;
        let verification: Verification = task.verification_as()?;
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return Ok(zero),
        };
        score_sql(task, &verification, &extract_sql(&response), run_in_sandbox)
    }

    fn reference(&self, task: &Task) -> Result<String, EnvError> {
        self.check_task(task)?;
        let verification: Verification = task.verification_as()?;
        Ok(verification.gold)
    }

    fn wrong_completions(&self, task: &Task) -> Result<Vec<String>, EnvError> {
        self.check_task(task)?;
        let verification: Verification = task.verification_as()?;
        let gold = &verification.gold;
        let first = verification
            .tables
            .first()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        let mut wrong = vec![
            format!("SELECT * FROM {first}"),
            format!("SELECT * FROM ({gold}) LIMIT 0"),
            format!("DROP TABLE {first}"),
            format!("DELETE FROM {first}; {gold}"),
            format!("<think>{gold}</think>"),
            gold.replace("SELECT", "SELEKT"),
        ];
        if verification.ordered {
            let flipped = if gold.contains(" DESC") {
                gold.replace(" DESC", " ASC")
            } else if gold.contains(" ASC") {
                gold.replace(" ASC", " DESC")
            } else {
                gold.replacen(" ORDER BY ", " ORDER BY 1 DESC, ", 1)
            };
            wrong.push(flipped);
        }
        Ok(wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testkit::*;
    use crate::sandbox::{Outcome, SandboxRequest};

    fn result(columns: usize, rows: Vec<Vec<Value>>) -> QueryResult {
        QueryResult {
            ok: true,
            error: String::new(),
            columns: (0..columns).map(|i| format!("c{i}")).collect(),
            rows,
            truncated: false,
        }
    }

    #[test]
    fn self_check_passes_in_the_sandbox() {
        assert_self_check_passes(&Sql, &[0, 2, 4, 6], 3);
    }

    #[test]
    fn scoring_in_the_sandbox_reports_the_difference() {
        let task = train_task(&Sql, 5, 1);
        let gold = Sql.reference(&task).unwrap();
        let score = Sql.score(&task, &format!("SQL: {gold}")).unwrap();
        assert!(score.is_full(), "{score:?}");
        assert_eq!(score.component("result"), Some(1.0));
        let verification: Verification = task.verification_as().unwrap();
        let table = &verification.tables[0].name;
        let wrong = Sql
            .score(&task, &format!("SELECT id, id FROM {table}"))
            .unwrap();
        assert_eq!(wrong.reward, 0.0);
        assert_eq!(wrong.component("executes"), Some(1.0));
        assert!(wrong.reason.starts_with("wrong result"), "{}", wrong.reason);
        let broken = Sql.score(&task, "SELECT nope FROM nowhere").unwrap();
        assert!(broken.reason.contains("no such table"), "{}", broken.reason);
    }

    #[test]
    fn comparison_ignores_order_unless_asked_and_tolerates_float_noise() {
        use serde_json::json;
        let gold = result(
            2,
            vec![vec![json!("a"), json!(1)], vec![json!("b"), json!(2.5)]],
        );
        let swapped = result(
            2,
            vec![
                vec![json!("b"), json!(2.5000000000001)],
                vec![json!("a"), json!(1.0)],
            ],
        );
        assert!(compare(&gold, &swapped, false).is_ok());
        let err = compare(&gold, &swapped, true).unwrap_err();
        assert!(err.contains("order"), "{err}");
        let off = result(
            2,
            vec![vec![json!("a"), json!(1)], vec![json!("b"), json!(2.6)]],
        );
        assert!(compare(&gold, &off, false).unwrap_err().contains("missing"));
        let narrow = result(1, vec![vec![json!("a")], vec![json!("b")]]);
        assert!(
            compare(&gold, &narrow, false)
                .unwrap_err()
                .contains("column")
        );
        let duplicated = result(
            2,
            vec![vec![json!("a"), json!(1)], vec![json!("a"), json!(1)]],
        );
        assert!(compare(&gold, &duplicated, false).is_err());
        assert!(!values_equal(&json!(3), &json!(4)));
        assert!(!values_equal(&json!("3"), &json!(3)));
        assert!(values_equal(&json!(null), &json!(null)));
        assert!(values_equal(&json!(1e12), &json!(1e12 + 1e-4)));
    }

    fn direct_score(task: &Task, completion: &str) -> Score {
        let verification: Verification = task.verification_as().unwrap();
        let response = match response_or_zero(completion) {
            Ok(response) => response,
            Err(zero) => return zero,
        };
        score_sql(task, &verification, &extract_sql(&response), run_directly).unwrap()
    }

    #[test]
    fn gold_queries_run_and_wrong_ones_fail_without_the_sandbox() {
        for level in 0..=MAX_DIFFICULTY {
            for seed in 0..2 {
                let task = train_task(&Sql, seed, level);
                let gold = Sql.reference(&task).unwrap();
                let score = direct_score(&task, &format!("```sql\n{gold};\n```"));
                assert!(score.is_full(), "level {level} {gold}: {score:?}");
                for wrong in Sql.wrong_completions(&task).unwrap() {
                    let score = direct_score(&task, &wrong);
                    assert!(!score.is_full(), "level {level} {wrong}: {score:?}");
                }
            }
        }
    }

    #[test]
    fn writes_and_runaway_queries_are_refused() {
        let task = train_task(&Sql, 1, 2);
        let verification: Verification = task.verification_as().unwrap();
        let table = &verification.tables[0].name;
        for (query, expect) in [
            (format!("DELETE FROM {table}"), "not authorized"),
            (format!("UPDATE {table} SET id = 0"), "not authorized"),
            ("ATTACH DATABASE 'x.db' AS x".to_string(), "not authorized"),
            ("PRAGMA table_info(pets)".to_string(), "not authorized"),
            ("SELECT 1; SELECT 2".to_string(), "one statement"),
            (
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
                    .to_string(),
                "interrupted",
            ),
        ] {
            let score = direct_score(&task, &query);
            assert_eq!(score.reward, 0.0, "{query}");
            assert!(score.reason.contains(expect), "{query}: {}", score.reason);
            assert_eq!(score.component("executes"), Some(0.0));
        }
        let many = direct_score(
            &task,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 5000) SELECT x FROM c",
        );
        assert!(many.reason.contains("more than 1000"), "{}", many.reason);
    }

    #[test]
    fn a_sandbox_that_cannot_start_scores_zero_with_the_reason() {
        fn broken(_: &SandboxRequest) -> Result<Outcome, String> {
            Err("the sandbox is unavailable: no backend works here".into())
        }
        let task = train_task(&Sql, 2, 0);
        let verification: Verification = task.verification_as().unwrap();
        let score = score_sql(&task, &verification, &verification.gold, broken).unwrap();
        assert_eq!(score.reward, 0.0);
        assert!(
            score.reason.contains("no backend works"),
            "{}",
            score.reason
        );
    }

    #[test]
    fn sql_is_pulled_out_of_fences_and_labels() {
        assert_eq!(extract_sql("```sql\nSELECT 1;\n```"), "SELECT 1;");
        assert_eq!(extract_sql("Here:\n```\nSELECT 2\n``` done"), "SELECT 2");
        assert_eq!(extract_sql("SQL: SELECT 3"), "SELECT 3");
        assert_eq!(extract_sql("<answer>SELECT 4</answer>"), "SELECT 4");
        assert_eq!(extract_sql("  SELECT 5  "), "SELECT 5");
        assert_eq!(extract_sql("```"), "");
        assert_eq!(extract_sql("```sql\nSELECT 6"), "SELECT 6");
        assert_eq!(
            extract_sql("The query is:\nselect 7\nFROM t"),
            "select 7\nFROM t"
        );
        assert_eq!(extract_sql("no query here"), "no query here");
    }

    #[test]
    fn level_zero_prompts_are_tiny_and_levels_grow() {
        for seed in 0..60 {
            let task = train_task(&Sql, seed, 0);
            assert!(task.prompt_text().len() <= 200, "{}", task.prompt_text());
            let verification: Verification = task.verification_as().unwrap();
            assert_eq!(verification.tables.len(), 1);
            assert_eq!(verification.tables[0].columns.len(), 2);
        }
        let task = train_task(&Sql, 3, 4);
        let verification: Verification = task.verification_as().unwrap();
        assert_eq!(verification.tables.len(), 2);
        assert!(verification.gold.contains("JOIN"), "{}", verification.gold);
    }

    #[test]
    fn splits_are_disjoint() {
        assert_splits_disjoint(&Sql, 0, 300);
        assert_splits_disjoint(&Sql, 5, 100);
    }

    #[test]
    fn every_question_template_is_reachable() {
        let mut golds = BTreeSet::new();
        for level in 0..=MAX_DIFFICULTY {
            for seed in 0..300 {
                let task = train_task(&Sql, seed, level);
                let verification: Verification = task.verification_as().unwrap();
                // The gold query's keywords and operators, identifiers and values dropped.
                let shape: String = verification
                    .gold
                    .split('\'')
                    .step_by(2)
                    .flat_map(str::chars)
                    .filter(|c| !c.is_ascii_lowercase() && !c.is_ascii_digit())
                    .collect();
                golds.insert(format!("{level}:{shape}:{}", verification.ordered));
            }
        }
        // 26 templates, two of which pick one of four aggregate functions.
        assert_eq!(golds.len(), 32, "{golds:#?}");
    }
}
