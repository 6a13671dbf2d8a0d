//! Shared-token authentication for every Chorus gRPC service.
//!
//! All components of a deployment share one secret token. Clients send it as
//! `authorization: Bearer <token>` metadata ([`AttachToken`]); servers reject
//! any call without it with `Unauthenticated` ([`RequireToken`]). Both are tonic
//! [`Interceptor`]s:
//!
//! ```no_run
//! # async fn demo(channel: tonic::transport::Channel) -> Result<(), Box<dyn std::error::Error>> {
//! use chorus_proto::auth::{AttachToken, RequireToken};
//! use chorus_proto::v1::environment_client::EnvironmentClient;
//!
//! // client side
//! let client = EnvironmentClient::with_interceptor(channel, AttachToken::new("s3cret")?);
//! // server side: wrap any generated server
//! let guard = RequireToken::new("s3cret")?;
//! # let _ = (client, guard);
//! # Ok(()) }
//! ```
//!
//! The comparison takes the same time wherever the first differing byte is, so
//! response timing does not leak the token. The token travels in clear text
//! unless the channel uses TLS.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Metadata key carrying the token.
pub const AUTHORIZATION: &str = "authorization";

const BEARER: &str = "Bearer ";

/// A token that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is empty.
    #[error("the shared auth token is empty")]
    Empty,
    /// The token has characters that cannot travel in gRPC metadata.
    #[error(
        "the shared auth token must be visible ASCII without spaces (bad character at byte {position})"
    )]
    InvalidCharacter {
        /// Byte offset of the first bad character.
        position: usize,
    },
}

fn validate(token: &str) -> Result<(), TokenError> {
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    match token.bytes().position(|b| !b.is_ascii_graphic()) {
        Some(position) => Err(TokenError::InvalidCharacter { position }),
        None => Ok(()),
    }
}

/// Client-side interceptor adding `authorization: Bearer <token>` to every call. Its `Debug`
/// never shows the token, and the header is marked sensitive (never indexed by HPACK, shown as
/// `Sensitive` by `http`'s `Debug`).
#[derive(Clone)]
pub struct AttachToken {
    value: MetadataValue<Ascii>,
}

impl std::fmt::Debug for AttachToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachToken").finish_non_exhaustive()
    }
}

impl AttachToken {
    /// An interceptor sending `token`.
    pub fn new(token: &str) -> Result<Self, TokenError> {
        validate(token)?;
        let mut value: MetadataValue<Ascii> = format!("{BEARER}{token}")
            .parse()
            .expect("visible ASCII is valid metadata");
        value.set_sensitive(true);
        Ok(Self { value })
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.value.clone());
        Ok(request)
    }
}

/// A credential (the shared token) whose `Debug` and `Display` print `***`, so a struct
/// holding one can derive `Debug` and be logged without leaking it. [`Secret::expose`] gives
/// the value to the code that sends or checks it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret value, for the code that sends or checks it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Server-side interceptor admitting only calls that carry the shared token.
#[derive(Clone)]
pub struct RequireToken {
    expected: Vec<u8>,
}

impl std::fmt::Debug for RequireToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequireToken").finish_non_exhaustive()
    }
}

impl RequireToken {
    /// An interceptor expecting `token`.
    pub fn new(token: &str) -> Result<Self, TokenError> {
        validate(token)?;
        Ok(Self {
            expected: token.as_bytes().to_vec(),
        })
    }

    /// Checks the metadata of one request.
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let header = request
            .metadata()
            .get(AUTHORIZATION)
            .ok_or_else(|| Status::unauthenticated("missing authorization metadata"))?;
        let presented = header
            .as_bytes()
            .strip_prefix(BEARER.as_bytes())
            .ok_or_else(|| Status::unauthenticated("authorization is not a Bearer token"))?;
        if constant_time_eq(presented, &self.expected) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid token"))
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

/// Equality whose running time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn with_header(value: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert(AUTHORIZATION, value.parse().unwrap());
        r
    }

    #[test]
    fn attach_then_require_round_trips() {
        let mut attach = AttachToken::new("tok-123").unwrap();
        let mut require = RequireToken::new("tok-123").unwrap();
        let r = attach.call(Request::new(())).unwrap();
        assert_eq!(r.metadata().get(AUTHORIZATION).unwrap(), "Bearer tok-123");
        assert!(require.call(r).is_ok());
    }

    #[test]
    fn wrong_missing_or_malformed_tokens_are_unauthenticated() {
        let mut require = RequireToken::new("tok-123").unwrap();
        for r in [
            Request::new(()),
            with_header("Bearer tok-124"),
            with_header("Bearer tok-1234"),
            with_header("Bearer "),
            with_header("Basic tok-123"),
            with_header("tok-123"),
        ] {
            assert_eq!(require.call(r).unwrap_err().code(), Code::Unauthenticated);
        }
    }

    #[test]
    fn unusable_tokens_are_refused() {
        assert_eq!(AttachToken::new("").unwrap_err(), TokenError::Empty);
        assert_eq!(
            RequireToken::new("ab c").unwrap_err(),
            TokenError::InvalidCharacter { position: 2 }
        );
        assert_eq!(
            AttachToken::new("é").unwrap_err(),
            TokenError::InvalidCharacter { position: 0 }
        );
    }

    #[test]
    fn debug_never_shows_the_token() {
        let attach = AttachToken::new("tok-secret-123").unwrap();
        let require = RequireToken::new("tok-secret-123").unwrap();
        let shown = format!(
            "{attach:?} {require:?} {:?}",
            Secret::from("tok-secret-123")
        );
        assert!(!shown.contains("secret"), "{shown}");
        let r = attach.clone().call(Request::new(())).unwrap();
        let header = format!("{:?}", r.metadata());
        assert!(!header.contains("secret"), "{header}");
    }

    #[test]
    fn constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
