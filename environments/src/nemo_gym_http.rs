//! The little HTTP/1.1 client the `nemo_gym` environment needs: JSON POSTs with a cookie,
//! a deadline per request and bounded retries of failures that may pass (connection errors,
//! timeouts, 5xx). Built on hyper's connection API, which tonic already brings in.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, COOKIE, HOST, SET_COOKIE};
use hyper_util::rt::TokioIo;

/// Where a server lives: `http://host:port[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseUrl {
    /// `host:port` for the TCP connection and the `Host` header.
    authority: String,
    /// Path prefix without a trailing slash (usually empty).
    prefix: String,
}

impl BaseUrl {
    /// Parses `http://host[:port][/prefix]`; https is refused (no TLS here).
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            return Err(
                "https is not supported for NeMo Gym servers; allowed: http://host:port".into(),
            );
        } else {
            return Err("not an address; allowed: http://host:port".into());
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err("no host; allowed: http://host:port".into());
        }
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            authority,
            prefix: prefix.to_string(),
        })
    }
}

/// An answer: status, cookies set, body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    /// `name=value` of every `Set-Cookie` header.
    pub cookies: Vec<String>,
    pub body: Bytes,
}

/// Why a request failed, and whether trying again may help.
#[derive(Debug)]
pub(crate) struct Failure {
    pub message: String,
    pub retryable: bool,
}

/// One request: a POST of `body`, or a GET when there is none.
async fn send_once(
    base: &BaseUrl,
    path: &str,
    body: Option<Bytes>,
    cookie: Option<&str>,
) -> Result<Answer, Failure> {
    let transient = |message: String| Failure {
        message,
        retryable: true,
    };
    let stream = tokio::net::TcpStream::connect(&base.authority)
        .await
        .map_err(|e| transient(format!("connecting to {}: {e}", base.authority)))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| transient(format!("HTTP handshake: {e}")))?;
    tokio::spawn(connection);
    let uri = format!("{}{path}", base.prefix);
    let mut request = match body {
        Some(_) => Request::post(uri).header(CONTENT_TYPE, "application/json"),
        None => Request::get(uri),
    }
    .header(HOST, &base.authority);
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    let request = request
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|e| Failure {
            message: format!("building the request: {e}"),
            retryable: false,
        })?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| transient(format!("sending the request: {e}")))?;
    let status = response.status().as_u16();
    let cookies = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .map(|v| v.trim().to_string())
        .filter(|v| v.contains('='))
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| transient(format!("reading the answer: {e}")))?
        .to_bytes();
    Ok(Answer {
        status,
        cookies,
        body,
    })
}

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

/// The start of a body, for error messages.
pub(crate) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(400) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_parse_with_ports_and_prefixes() {
        assert_eq!(
            BaseUrl::parse("http://127.0.0.1:8000").unwrap(),
            BaseUrl {
                authority: "127.0.0.1:8000".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            BaseUrl::parse("http://gym/mcqa/").unwrap(),
            BaseUrl {
                authority: "gym:80".into(),
                prefix: "/mcqa".into()
            }
        );
        assert!(BaseUrl::parse("https://gym").unwrap_err().contains("https"));
        assert!(BaseUrl::parse("gym:80").unwrap_err().contains("http://"));
        assert!(BaseUrl::parse("http:///x").is_err());
    }
}
