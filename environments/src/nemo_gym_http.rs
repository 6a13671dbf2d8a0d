//! What the `nemo_gym` environment adds to `chorus_proto::http`: a deadline per request and
//! bounded retries of failures that may pass (connection errors, timeouts, 5xx), and which
//! answers count as results.

use std::time::Duration;

use bytes::Bytes;
pub(crate) use chorus_proto::http::{Answer, BaseUrl, snippet};
use chorus_proto::http::{Failure, send_once};

/// Which answers a request takes as its result rather than as a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accept {
    /// Only 2xx.
    Success,
    /// 2xx and 4xx: a tool route's 4xx (arguments the route's schema refuses, a route that does
    /// not exist) is an answer the model reads, as NeMo Gym's own agents pass it on.
    ClientErrors,
}

/// POSTs `body` (JSON) to `path`, or GETs it when `body` is `None`, each attempt within
/// `timeout`, retrying connection errors, timeouts and 5xx answers up to `retries` more times;
/// any other answer that `accept` does not take is a failure carrying the start of its body.
pub(crate) async fn request_json(
    base: &BaseUrl,
    path: &str,
    body: Option<Bytes>,
    cookie: Option<&str>,
    timeout: Duration,
    retries: u32,
    accept: Accept,
) -> Result<Answer, String> {
    let mut attempt = 0;
    loop {
        let failure: Failure = match tokio::time::timeout(
            timeout,
            send_once(base, path, body.clone(), cookie),
        )
        .await
        {
            Err(_) => Failure {
                message: format!("no answer within {timeout:?}"),
                retryable: true,
            },
            Ok(Ok(answer)) if (200..300).contains(&answer.status) => return Ok(answer),
            Ok(Ok(answer))
                if accept == Accept::ClientErrors && (400..500).contains(&answer.status) =>
            {
                return Ok(answer);
            }
            Ok(Ok(answer)) => Failure {
                message: format!("HTTP {}: {}", answer.status, snippet(&answer.body)),
                retryable: answer.status >= 500,
            },
            Ok(Err(failure)) => failure,
        };
        if !failure.retryable || attempt >= retries {
            let tries = if attempt > 0 {
                format!(" (after {} attempts)", attempt + 1)
            } else {
                String::new()
            };
            return Err(format!("{}{tries}", failure.message));
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
    }
}
