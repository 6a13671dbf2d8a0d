//! Progress bars on a terminal (indicatif); plain lines everywhere else.
//!
//! When standard error is a terminal and logs are text, a `chorus run` stage shows a bar of its
//! steps (its start event carries `steps`; each learner step's event carries `step`, `loss` and
//! `reward`), a rollout worker serving on its own (`chorus serve worker`) shows the bytes of each
//! weight transfer (events of the `chorus_progress` target), and log lines print above them.
//! Commands with their own loops (quantize, env score) take a [`bar`] directly.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};

use super::logging::PROGRESS_TARGET;

/// Whether bars are drawn: standard error is a terminal.
pub fn interactive() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// A bar of `len` items named `prefix`, or `None` off a terminal (the caller prints lines).
pub fn bar(len: u64, prefix: &str, unit: &str) -> Option<ProgressBar> {
    interactive().then(|| {
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{{prefix}} [{{bar:32}}] {{pos}}/{{len}} {unit} {{elapsed_precise}} eta {{eta}} {{msg}}"
            ))
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(prefix.to_string());
        bar.enable_steady_tick(Duration::from_millis(250));
        bar
    })
}

/// The stage bar of `chorus run`, with the global step its stage started after, and the bar of
/// the weight transfer under way (drawn only where no stage bar is: `chorus serve worker`).
#[derive(Default)]
struct StageBar {
    bar: Option<ProgressBar>,
    first_step: Option<u64>,
    transfer: Option<(u64, ProgressBar)>,
}

/// A bar of bytes without a known total (a weight stream's size comes with its end).
fn transfer_bar(version: u64) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} {spinner} {bytes} {binary_bytes_per_sec} {elapsed_precise} {msg}",
        )
        .expect("a valid template"),
    );
    bar.set_prefix(format!("weights v{version}"));
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

fn current() -> &'static Arc<Mutex<StageBar>> {
    static BAR: OnceLock<Arc<Mutex<StageBar>>> = OnceLock::new();
    BAR.get_or_init(Default::default)
}

/// Log lines written above the bar (the bar is hidden while a line prints).
#[derive(Clone, Copy, Default)]
pub struct AboveBars;

/// One event's text, printed whole when the formatter is done with it.
pub struct LineWriter(Vec<u8>);

impl Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let text = std::mem::take(&mut self.0);
        let print = || {
            let _ = std::io::stderr().lock().write_all(&text);
        };
        let state = current().lock().unwrap_or_else(|p| p.into_inner());
        match (&state.bar, &state.transfer) {
            (Some(bar), _) | (None, Some((_, bar))) => bar.suspend(print),
            (None, None) => print(),
        }
    }
}

impl<'a> MakeWriter<'a> for AboveBars {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(Vec::new())
    }
}

/// Drives the stage bar from the run's events.
pub struct StageBars;

#[derive(Default)]
struct Numbers {
    message: String,
    policy_version: Option<u64>,
    received_bytes: Option<u64>,
    done: bool,
    steps: Option<u64>,
    prompts_per_step: Option<u64>,
    step: Option<u64>,
    loss: Option<f64>,
    reward: Option<f64>,
    supervised: Option<bool>,
}

impl Visit for Numbers {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "steps" => self.steps = Some(value),
            "prompts_per_step" => self.prompts_per_step = Some(value),
            "step" => self.step = Some(value),
            "policy_version" => self.policy_version = Some(value),
            "received_bytes" => self.received_bytes = Some(value),
            _ => {}
        }
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        match field.name() {
            "loss" => self.loss = Some(value),
            "reward" => self.reward = Some(value),
            _ => {}
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        match field.name() {
            "supervised" => self.supervised = Some(value),
            "done" => self.done = value,
            _ => {}
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for StageBars {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut n = Numbers::default();
        event.record(&mut n);
        let mut state = current().lock().unwrap_or_else(|p| p.into_inner());
        if event.metadata().target().starts_with(PROGRESS_TARGET) {
            let (Some(version), Some(bytes)) = (n.policy_version, n.received_bytes) else {
                return;
            };
            // Inside `chorus run` transfers are local and quick: the stage bar is what to watch.
            if state.bar.is_some() {
                return;
            }
            if state.transfer.as_ref().is_none_or(|(v, _)| *v != version) {
                if let Some((_, old)) = state.transfer.take() {
                    old.finish_and_clear();
                }
                state.transfer = Some((version, transfer_bar(version)));
            }
            if let Some((_, bar)) = &state.transfer {
                bar.set_position(bytes);
                if n.done {
                    bar.finish_with_message("received");
                    state.transfer = None;
                }
            }
            return;
        }
        if let (Some(steps), Some(_)) = (n.steps, n.prompts_per_step) {
            // A stage starts: "stage NAME (KIND): …".
            if let Some(old) = state.bar.take() {
                old.finish_and_clear();
            }
            let name = n.message.split(':').next().unwrap_or("stage").to_string();
            if let Some((_, transfer)) = state.transfer.take() {
                transfer.finish_and_clear();
            }
            *state = StageBar {
                bar: bar(steps, &name, "steps"),
                first_step: None,
                transfer: None,
            };
        } else if let (Some(step), Some(loss)) = (n.step, n.loss) {
            let first = *state.first_step.get_or_insert(step.saturating_sub(1));
            if let Some(bar) = &state.bar {
                bar.set_position(step - first);
                let reward = match (n.supervised, n.reward) {
                    (Some(false), Some(r)) => format!(" reward {r:.3}"),
                    _ => String::new(),
                };
                bar.set_message(format!("loss {loss:.4}{reward}"));
                if bar.position() >= bar.length().unwrap_or(u64::MAX) {
                    // `finish` draws the full bar whatever the refresh rate skipped, and leaves it.
                    bar.finish();
                    state.bar = None;
                }
            }
        }
    }
}
