//! `chorus plot`: a run's curves as SVG and PNG files (plotters), the same curves the dashboard
//! draws, from the same ledger reads.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chorus_orchestrator::ledger::Ledger;
use clap::Args;
use plotters::prelude::*;
use serde_json::Value;

/// Write a run's curves as SVG and PNG: mean reward and held-out accuracy per environment, loss,
/// KL, entropy, gradient norm, learning rate, clip fraction, sampling mismatch, throughput and
/// the staleness of trained rollouts, one file pair per curve (for papers, and for machines
/// without a browser; `chorus dashboard` shows the same live).
///
/// Examples:
///   chorus plot quickstart-20261204-011918-3fa2b1c0 --out plots
///   chorus plot RUN --db postgres://chorus:chorus@127.0.0.1/chorus --out plots --font /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct PlotArgs {
    /// Run id (see `chorus inspect runs`); default: the newest run in the ledger.
    run: Option<String>,
    /// Ledger database: sqlite://PATH or postgres://… (default: the newest runs/*/ledger.sqlite).
    #[arg(long)]
    db: Option<String>,
    /// Directory to write `<curve>.svg` and `<curve>.png` into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// A TrueType font for the labels [default: DejaVu Sans or Liberation Sans from
    /// /usr/share/fonts, else the first .ttf found there].
    #[arg(long)]
    font: Option<PathBuf>,
}

/// One curve: its file name, title, x label and series (name, points).
struct Curve {
    key: String,
    title: String,
    x_label: &'static str,
    series: Vec<(String, Vec<(f64, f64)>)>,
    bars: bool,
}

pub fn run(a: PlotArgs) -> anyhow::Result<()> {
    let db = match a.db {
        Some(db) => db,
        None => super::inspect::default_db()?,
    };
    let font = find_font(a.font.as_deref())?;
    let bytes: &'static [u8] = Box::leak(
        std::fs::read(&font)
            .with_context(|| format!("reading the font {}", font.display()))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
        anyhow::anyhow!(
            "{} is not a TrueType font plotters can read",
            font.display()
        )
    })?;
    let data = super::runtime(1)?.block_on(async {
        let ledger = Ledger::open(&db)
            .await
            .with_context(|| format!("opening {db}"))?;
        let run = match a.run {
            Some(r) => r,
            None => ledger
                .list_runs(1)
                .await?
                .into_iter()
                .next()
                .map(|r| r.id)
                .with_context(|| format!("no run in {db}"))?,
        };
        if ledger.get_run(&run).await?.is_none() {
            bail!("no run `{run}` in {db} (see `chorus inspect runs`)");
        }
        Ok(super::dashboard::curves_json(&ledger, &run).await?)
    })?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let curves = curves_of(&data);
    let total = curves.len();
    for (i, c) in curves.iter().enumerate() {
        for ext in ["svg", "png"] {
            let path = a.out.join(format!("{}.{ext}", c.key));
            draw(c, &path, ext).with_context(|| format!("drawing {}", path.display()))?;
        }
        tracing::info!("plot {}/{total}: {}", i + 1, c.key);
    }
    println!(
        "wrote {total} curves of run {} to {} (.svg and .png)",
        data["run"].as_str().unwrap_or_default(),
        a.out.display()
    );
    Ok(())
}

fn find_font(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let root = Path::new("/usr/share/fonts");
    let mut found = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "ttf") {
                found.push(p);
            }
        }
    }
    found.sort();
    let preferred = ["DejaVuSans.ttf", "LiberationSans-Regular.ttf"];
    preferred
        .iter()
        .find_map(|name| found.iter().find(|p| p.ends_with(name)))
        .or_else(|| found.first())
        .cloned()
        .context(
            "no TrueType font under /usr/share/fonts for the labels: give one with --font \
             PATH.ttf (Debian: apt-get install fonts-dejavu-core)",
        )
}

fn points(v: &Value) -> Vec<(f64, f64)> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
        .collect()
}

/// The curves of a run's `curves_json`, as the dashboard lists them.
fn curves_of(data: &Value) -> Vec<Curve> {
    let by_env = |key: &str| -> Vec<(String, Vec<(f64, f64)>)> {
        data[key]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(env, pts)| (env.clone(), points(pts)))
            .collect()
    };
    let mut out = vec![
        Curve {
            key: "reward".into(),
            title: "mean reward of scored rollouts".into(),
            x_label: "learner step (dispatched at)",
            series: by_env("reward"),
            bars: false,
        },
        Curve {
            key: "accuracy".into(),
            title: "held-out accuracy".into(),
            x_label: "policy version",
            series: by_env("accuracy"),
            bars: false,
        },
    ];
    let per_step = [
        ("loss", "loss"),
        ("kl", "KL"),
        ("entropy", "entropy"),
        ("grad_norm", "gradient norm (before clipping)"),
        ("learning_rate", "learning rate"),
        ("clip_fraction", "clip fraction"),
        (
            "mismatch",
            "sampling mismatch |log p_learner - log p_worker|",
        ),
        ("trajectories_per_second", "trajectories / s"),
        ("tokens_per_second", "trained tokens / s"),
    ];
    for (key, title) in per_step {
        let pts: Vec<(f64, f64)> = data["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s["step"].as_f64()?, s[key].as_f64()?)))
            .collect();
        out.push(Curve {
            key: key.into(),
            title: title.into(),
            x_label: "learner step",
            series: vec![(key.to_string(), pts)],
            bars: false,
        });
    }
    let sync = |column: usize| -> Vec<(f64, f64)> {
        data["weight_sync"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| Some((w[0].as_f64()?, w[column].as_f64()?)))
            .collect()
    };
    out.push(Curve {
        key: "weight_sync".into(),
        title: "weight sync seconds".into(),
        x_label: "policy version",
        series: vec![
            ("mean transfer".into(), sync(1)),
            ("to the last worker".into(), sync(3)),
        ],
        bars: false,
    });
    out.push(Curve {
        key: "lag".into(),
        title: "staleness of trained rollouts (count)".into(),
        x_label: "versions behind",
        series: vec![("rollouts".into(), points(&data["lag"]))],
        bars: true,
    });
    out
}

const COLORS: [RGBColor; 6] = [
    RGBColor(52, 97, 224),
    RGBColor(217, 48, 37),
    RGBColor(24, 128, 56),
    RGBColor(227, 116, 0),
    RGBColor(132, 48, 206),
    RGBColor(0, 131, 143),
];

fn draw(c: &Curve, path: &Path, ext: &str) -> anyhow::Result<()> {
    let size = (720, 420);
    if ext == "svg" {
        let root = SVGBackend::new(path, size).into_drawing_area();
        chart(c, &root)?;
        root.present()?;
    } else {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        chart(c, &root)?;
        root.present()?;
    }
    Ok(())
}

fn chart<DB: DrawingBackend>(
    c: &Curve,
    root: &DrawingArea<DB, plotters::coord::Shift>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let all: Vec<(f64, f64)> = c
        .series
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = all.iter().fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    if all.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if c.bars {
        (x0, x1, y0) = (x0 - 0.5, x1 + 0.5, 0.0);
    }
    if x0 == x1 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    if y0 == y1 {
        let pad = y0.abs() * 0.1 + 1e-9;
        (y0, y1) = (y0 - pad, y1 + pad);
    }
    let mut ch = ChartBuilder::on(root)
        .caption(&c.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    ch.configure_mesh()
        .x_desc(c.x_label)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, pts)) in c.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        if c.bars {
            ch.draw_series(
                pts.iter()
                    .map(|&(x, y)| Rectangle::new([(x - 0.3, 0.0), (x + 0.3, y)], color.filled())),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        } else {
            ch.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2))
                });
        }
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
