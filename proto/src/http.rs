//! A little HTTP/1.1 client for the JSON services Chorus talks to besides its own gRPC ones
//! (NeMo Gym resources servers, vLLM's OpenAI-compatible server): one request per connection,
//! on hyper's connection API, which tonic already brings in. Deadlines and retries are the
//! caller's.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, COOKIE, HOST, SET_COOKIE};
use hyper_util::rt::TokioIo;

/// Where a server lives: `http://host:port[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `host:port` for the TCP connection and the `Host` header.
    authority: String,
    /// Path prefix without a trailing slash (usually empty).
    prefix: String,
}

impl BaseUrl {
    /// Parses `http://host[:port][/prefix]`; https is refused (no TLS here).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            return Err("https is not supported here; allowed: http://host:port".into());
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
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// `name=value` of every `Set-Cookie` header.
    pub cookies: Vec<String>,
    /// The body, whole.
    pub body: Bytes,
}

/// Why a request failed, and whether trying again may help.
#[derive(Debug)]
pub struct Failure {
    /// What failed.
    pub message: String,
    /// True for failures that may pass (connection errors); false for a request that cannot be
    /// built.
    pub retryable: bool,
}

/// The largest answer body read (NeMo Gym verdicts and vLLM completions are far smaller; a
/// longer one is an error, not an allocation).
pub const MAX_ANSWER_BYTES: usize = 256 << 20;

/// One request: a POST of `body` (JSON), or a GET when there is none, with `cookie` when given.
pub async fn send_once(
    base: &BaseUrl,
    path: &str,
    body: Option<Bytes>,
    cookie: Option<&str>,
) -> Result<Answer, Failure> {
    send_limited(base, path, body, cookie, MAX_ANSWER_BYTES).await
}

/// [`send_once`], reading at most `max_answer_bytes` of the answer's body.
async fn send_limited(
    base: &BaseUrl,
    path: &str,
    body: Option<Bytes>,
    cookie: Option<&str>,
    max_answer_bytes: usize,
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
    // A server that never stops sending must not exhaust this process's memory.
    let body = http_body_util::Limited::new(response.into_body(), max_answer_bytes)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Failure {
                    message: format!("the answer is longer than {max_answer_bytes} bytes"),
                    retryable: false,
                }
            } else {
                transient(format!("reading the answer: {e}"))
            }
        })?
        .to_bytes();
    Ok(Answer {
        status,
        cookies,
        body,
    })
}

/// The start of a body, for error messages.
pub fn snippet(body: &[u8]) -> String {
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

    #[tokio::test]
    async fn an_answer_past_the_limit_is_an_error_not_an_allocation() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..2 {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                let body = vec![b'x'; 10_000];
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            }
        });
        let base = BaseUrl::parse(&format!("http://{addr}")).unwrap();
        let err = send_limited(&base, "/", None, None, 1000)
            .await
            .unwrap_err();
        assert!(
            err.message.contains("longer than 1000 bytes"),
            "{}",
            err.message
        );
        assert!(!err.retryable);
        let answer = send_limited(&base, "/", None, None, 20_000).await.unwrap();
        assert_eq!(answer.body.len(), 10_000);
    }
}
