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

/// One request: a POST of `body` (JSON), or a GET when there is none, with `cookie` when given.
pub async fn send_once(
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
}
