//! Where log events go: standard error, as human-readable lines (`--log-format text`, the
//! default) or one JSON object per line with every enclosing span's fields
//! (`--log-format json`), filtered by `RUST_LOG` (default: `info` for Chorus, `warn` for its
//! dependencies).
//!
//! The text format keeps `chorus run`'s progress as plain lines: an info event shows only its
//! message; a warning or error is prefixed so; debug and trace events also show their target and
//! spans (run, stage, step, request ids).

use std::fmt;

use clap::ValueEnum;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Plain lines for people.
    #[default]
    Text,
    /// One JSON object per event, with its spans' fields, for log collectors.
    Json,
}

/// The target of events only the progress bars read (e.g. bytes of a weight transfer).
pub const PROGRESS_TARGET: &str = "chorus_progress";

/// The filter when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "warn,chorus=info,chorus_runtime=info,chorus_orchestrator=info,\
chorus_learner=info,chorus_rollout_worker=info,chorus_environments=info,chorus_model=info,\
chorus_kernels=info,chorus_proto=info";

/// Installs the process's subscriber. Fails on a malformed `RUST_LOG`, naming it.
pub fn init(format: LogFormat) -> anyhow::Result<()> {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_FILTER.to_string());
    let filter = EnvFilter::try_new(&spec).map_err(|e| {
        anyhow::anyhow!("RUST_LOG=`{spec}` is not a valid filter ({e}); e.g. RUST_LOG=debug or RUST_LOG=chorus_orchestrator=debug")
    })?;
    if format == LogFormat::Text && super::progress::interactive() {
        // On a terminal: progress bars, with log lines printed above them. The bars also read
        // the `chorus_progress` events (weight transfers), which the log lines leave out.
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let bars = EnvFilter::try_new(format!("{spec},{PROGRESS_TARGET}=trace"))?;
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(Human)
                    .with_ansi(true)
                    .with_writer(super::progress::AboveBars)
                    .with_filter(filter),
            )
            .with(super::progress::StageBars.with_filter(bars))
            .try_init();
        return Ok(());
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second init (tests calling `run` twice) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.event_format(Human).try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    Ok(())
}

/// The text format: see the module docs.
struct Human;

impl<S, N> FormatEvent<S, N> for Human
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let level = *meta.level();
        match level {
            Level::ERROR => write!(writer, "error: ")?,
            Level::WARN => write!(writer, "warning: ")?,
            Level::INFO => {}
            _ => {
                write!(writer, "{level} {}: ", meta.target())?;
                if let Some(scope) = ctx.event_scope() {
                    for span in scope.from_root() {
                        write!(writer, "{}", span.name())?;
                        if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                            && !fields.is_empty()
                        {
                            write!(writer, "{{{fields}}}")?;
                        }
                        write!(writer, ": ")?;
                    }
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        write!(writer, "{}", fields.message)?;
        // Fields the message already shows (an error it quotes) are not repeated.
        let rest: Vec<&str> = fields
            .rest
            .iter()
            .filter(|(_, value)| !fields.message.contains(value.as_str()))
            .map(|(field, _)| field.as_str())
            .collect();
        if level != Level::INFO && !rest.is_empty() {
            write!(writer, " ({})", rest.join(", "))?;
        }
        writeln!(writer)
    }
}

/// An event's message, and its other fields as (`name=value`, value).
#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.rest
                .push((format!("{}={value}", field.name()), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.rest
                .push((format!("{}={value:?}", field.name()), format!("{value:?}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn text_of(f: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .with_ansi(false)
            .with_writer(buffer.clone())
            .event_format(Human)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn info_lines_read_as_plain_progress_and_others_carry_their_context() {
        let text = text_of(|| {
            let span = tracing::info_span!("run", run_id = "r-1");
            let _in = span.enter();
            tracing::info!(step = 3, "step    3 rl  loss 0.1");
            tracing::warn!(env = "sql", "environment paused");
            tracing::error!(error = "boom", "the run failed: boom");
            tracing::debug!(request_id = "r-1/s0/p2/c1", "dispatched");
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "step    3 rl  loss 0.1");
        assert_eq!(lines[1], "warning: environment paused (env=sql)");
        assert_eq!(lines[2], "error: the run failed: boom");
        assert!(
            lines[3].starts_with("DEBUG ")
                && lines[3].contains("run{run_id=\"r-1\"}: dispatched")
                && lines[3].contains("request_id=r-1/s0/p2/c1"),
            "{}",
            lines[3]
        );
    }
}
