//! TLS (rustls) for every Chorus gRPC service and client.
//!
//! A process has one TLS identity and one trust setting, given by its `--tls-cert`,
//! `--tls-key` and `--tls-ca` files ([`TlsFiles`]), loaded and checked once ([`Tls`]) and
//! installed for the whole process ([`install`]):
//!
//! - with a certificate and key, every service the process serves speaks TLS ([`server`]),
//!   and its URL is `https://…`; with a CA as well, it is mutual TLS: a client must present a
//!   certificate signed by that CA, or its handshake fails;
//! - every client the process opens to an `https://` URL ([`endpoint`]) trusts the CA (else
//!   the system's roots) and presents the certificate and key, when given, as its identity.
//!
//! `http://` URLs stay plain text, so a process can still reach a plain service.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use chorus_proto::tls::{self, TlsFiles};
//!
//! let files = TlsFiles {
//!     cert: Some("server.pem".into()),
//!     key: Some("server.key".into()),
//!     ca: Some("ca.pem".into()),
//!     server_name: None,
//! };
//! if let Some(loaded) = files.load()? {
//!     tls::install(loaded)?;
//! }
//! // Every server built with `tls::server()` now requires client certificates from ca.pem,
//! // and `tls::endpoint("https://10.0.0.2:7000")` dials with this identity.
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::limits;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// Environment variable a child process reads its `--tls-cert` from.
pub const CERT_ENV: &str = "CHORUS_TLS_CERT";
/// Environment variable a child process reads its `--tls-key` from.
pub const KEY_ENV: &str = "CHORUS_TLS_KEY";
/// Environment variable a child process reads its `--tls-ca` from.
pub const CA_ENV: &str = "CHORUS_TLS_CA";
/// Environment variable a child process reads its `--tls-server-name` from.
pub const SERVER_NAME_ENV: &str = "CHORUS_TLS_SERVER_NAME";

/// A TLS handshake taking longer than this fails, so a silent peer cannot hold a connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong with the TLS settings; every variant names the file and the flag.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{flag} {}: cannot read it: {source}", path.display())]
    Read {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not what its flag needs.
    #[error("{flag} {}: {what}", path.display())]
    Invalid {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What was wrong, and what is expected.
        what: String,
    },
    /// The flags do not go together.
    #[error("{0}")]
    Flags(String),
    /// [`install`] was called twice.
    #[error("the process's TLS settings are already installed")]
    AlreadyInstalled,
    /// tonic refused the configuration.
    #[error("configuring TLS: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The TLS files of a process: its certificate chain and private key (PEM), and the CA (PEM)
/// that its peers' certificates must be signed by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain (`--tls-cert`): served to clients, presented to servers.
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (`--tls-key`).
    pub key: Option<PathBuf>,
    /// The CA (`--tls-ca`): servers require client certificates it signed (mutual TLS); clients
    /// trust servers whose certificates it signed.
    pub ca: Option<PathBuf>,
    /// The name clients check servers' certificates against (`--tls-server-name`), instead of
    /// the host of the URL they dial: for services reached by addresses no certificate can name
    /// in advance (pod IPs), all serving a certificate for this one name.
    pub server_name: Option<String>,
}

impl TlsFiles {
    /// No file given: plain text.
    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.ca.is_none() && self.server_name.is_none()
    }

    /// Reads and checks the files: `None` when none is given. The certificate and key must be
    /// given together, hold at least one certificate and one private key, and the key must be
    /// the certificate's.
    pub fn load(&self) -> Result<Option<Tls>, TlsError> {
        if self.is_empty() {
            return Ok(None);
        }
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(load_identity(cert, key)?),
            (None, None) => None,
            (Some(_), None) => {
                return Err(TlsError::Flags(
                    "--tls-cert needs --tls-key (the certificate's private key)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(TlsError::Flags(
                    "--tls-key needs --tls-cert (the certificate it belongs to)".into(),
                ));
            }
        };
        if self.server_name.as_deref() == Some("") {
            return Err(TlsError::Flags(
                "--tls-server-name is empty; give the DNS name the services' certificates name"
                    .into(),
            ));
        }
        let ca = match &self.ca {
            Some(path) => {
                let pem = read("--tls-ca", path)?;
                certificates("--tls-ca", path, &pem)?;
                Some(Certificate::from_pem(pem))
            }
            None => None,
        };
        Ok(Some(Tls {
            files: self.clone(),
            identity,
            ca,
        }))
    }

    /// The environment that hands these settings to a child `chorus` process (which reads
    /// `CHORUS_TLS_CERT`, `CHORUS_TLS_KEY`, `CHORUS_TLS_CA` and `CHORUS_TLS_SERVER_NAME` like
    /// its flags).
    pub fn child_env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let mut env: Vec<(&'static str, std::ffi::OsString)> = [
            (CERT_ENV, &self.cert),
            (KEY_ENV, &self.key),
            (CA_ENV, &self.ca),
        ]
        .into_iter()
        .filter_map(|(name, path)| Some((name, absolute(path.as_ref()?).into_os_string())))
        .collect();
        if let Some(name) = &self.server_name {
            env.push((SERVER_NAME_ENV, name.into()));
        }
        env
    }
}

/// A path a child process in another working directory finds too.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file: at least one, all well-formed.
fn certificates(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |what: String| TlsError::Invalid {
        flag,
        path: path.to_path_buf(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not a valid PEM file ({e})")))?;
    if certs.is_empty() {
        return Err(invalid(
            "holds no certificate; expected PEM `-----BEGIN CERTIFICATE-----` blocks".into(),
        ));
    }
    Ok(certs)
}

fn load_identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let cert_pem = read("--tls-cert", cert)?;
    let chain = certificates("--tls-cert", cert, &cert_pem)?;
    let key_pem = read("--tls-key", key)?;
    let invalid_key = |what: String| TlsError::Invalid {
        flag: "--tls-key",
        path: key.to_path_buf(),
        what,
    };
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => invalid_key(
            "holds no private key; expected a PEM `PRIVATE KEY` (PKCS#8), `RSA PRIVATE KEY` or \
             `EC PRIVATE KEY` block"
                .into(),
        ),
        e => invalid_key(format!("not a valid PEM file ({e})")),
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| invalid_key(format!("not a usable private key ({e})")))?;
    rustls::sign::CertifiedKey::new(chain, signing)
        .keys_match()
        .map_err(|e| {
            invalid_key(format!(
                "is not the private key of the certificate in {} ({e})",
                cert.display()
            ))
        })?;
    Ok(Identity::from_pem(cert_pem, key_pem))
}

/// A process's loaded TLS settings (see [`TlsFiles::load`]). Its `Debug` shows the file names,
/// never the key.
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    identity: Option<Identity>,
    ca: Option<Certificate>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// The files these settings were loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether servers of this process speak TLS (a certificate and key were given).
    pub fn serves(&self) -> bool {
        self.identity.is_some()
    }

    /// The servers' configuration: this certificate, and with a CA, client certificates
    /// required and checked against it. `None` without a certificate (servers stay plain).
    pub fn server_config(&self) -> Option<ServerTlsConfig> {
        let identity = self.identity.clone()?;
        let mut config = ServerTlsConfig::new()
            .identity(identity)
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.ca {
            config = config.client_ca_root(ca.clone());
        }
        Some(config)
    }

    /// The configuration of a client dialing `domain` (the host name or IP its certificate
    /// must name; `--tls-server-name` instead, when given): servers are trusted when the CA signed their certificate (without a CA:
    /// the system's roots), and this certificate, if any, is presented to them.
    pub fn client_config(&self, domain: &str) -> ClientTlsConfig {
        let domain = self.files.server_name.as_deref().unwrap_or(domain);
        let mut config = ClientTlsConfig::new()
            .domain_name(domain)
            .timeout(HANDSHAKE_TIMEOUT);
        config = match &self.ca {
            Some(ca) => config.ca_certificate(ca.clone()),
            None => config.with_native_roots(),
        };
        if let Some(identity) = &self.identity {
            config = config.identity(identity.clone());
        }
        config
    }
}

static INSTALLED: OnceLock<Tls> = OnceLock::new();

/// Makes `tls` this process's TLS settings, used by [`server`] and [`endpoint`]. Once only.
pub fn install(tls: Tls) -> Result<(), TlsError> {
    INSTALLED.set(tls).map_err(|_| TlsError::AlreadyInstalled)
}

/// This process's TLS settings, if installed.
pub fn installed() -> Option<&'static Tls> {
    INSTALLED.get()
}

/// The scheme of this process's services: `https` when they speak TLS, else `http`.
pub fn scheme() -> &'static str {
    if installed().is_some_and(Tls::serves) {
        "https"
    } else {
        "http"
    }
}

/// A server builder speaking TLS when this process has a certificate (see [`install`]), with
/// Chorus' HTTP/2 windows and frame size (`limits::HTTP2_*`).
pub fn server() -> Result<Server, TlsError> {
    let builder = Server::builder()
        .initial_stream_window_size(limits::HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(limits::HTTP2_CONNECTION_WINDOW_BYTES)
        .max_frame_size(limits::HTTP2_MAX_FRAME_BYTES);
    Ok(match installed().and_then(Tls::server_config) {
        Some(config) => builder.tls_config(config)?,
        None => builder,
    })
}

/// A URL that cannot be dialed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Not a URL Chorus dials.
    #[error(
        "`{url}` is not a valid address ({what}); expected http://HOST:PORT or https://HOST:PORT"
    )]
    Invalid {
        /// The URL.
        url: String,
        /// What was wrong.
        what: String,
    },
    /// tonic refused the TLS configuration.
    #[error("configuring TLS for {url}: {source}")]
    Tls {
        /// The URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// The endpoint of a service at `url`, with Chorus' HTTP/2 windows and frame size
/// (`limits::HTTP2_*`): plain text for `http://`, TLS for `https://` with this process's settings (see [`Tls::client_config`]; without any installed, the system's roots
/// and no client certificate).
pub fn endpoint(url: &str) -> Result<Endpoint, EndpointError> {
    let invalid = |what: String| EndpointError::Invalid {
        url: url.to_string(),
        what,
    };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| invalid(e.to_string()))?
        .initial_stream_window_size(limits::HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(limits::HTTP2_CONNECTION_WINDOW_BYTES)
        .max_frame_size(limits::HTTP2_MAX_FRAME_BYTES);
    let uri = endpoint.uri();
    match uri.scheme_str() {
        Some("http") => Ok(endpoint),
        Some("https") => {
            let host = uri
                .host()
                .ok_or_else(|| invalid("no host".into()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let config = match installed() {
                Some(tls) => tls.client_config(&host),
                None => ClientTlsConfig::new()
                    .domain_name(host)
                    .with_native_roots()
                    .timeout(HANDSHAKE_TIMEOUT),
            };
            endpoint
                .tls_config(config)
                .map_err(|source| EndpointError::Tls {
                    url: url.to_string(),
                    source,
                })
        }
        other => Err(invalid(match other {
            Some(s) => format!("scheme `{s}`"),
            None => "no scheme".into(),
        })),
    }
}

/// What to add to the error of a call to `url` that failed with `status`: over `https://`, a
/// connection closed under the call is most often a server requiring mutual TLS that refused
/// this client's certificate (TLS 1.3 reports that to the client only as the closed
/// connection). Empty otherwise.
pub fn refusal_hint(url: &str, status: &tonic::Status) -> &'static str {
    let transport = std::error::Error::source(status).is_some()
        && matches!(
            status.code(),
            tonic::Code::Unknown | tonic::Code::Unavailable
        );
    if transport && url.starts_with("https://") {
        " (the TLS connection was closed: if the service requires client certificates, give \
         this command a --tls-cert and --tls-key signed by its CA, and that CA as --tls-ca)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, cert: Option<&str>, key: Option<&str>, ca: Option<&str>) -> TlsFiles {
        TlsFiles {
            cert: cert.map(|c| dir.join(c)),
            key: key.map(|k| dir.join(k)),
            ca: ca.map(|c| dir.join(c)),
            server_name: None,
        }
    }

    struct Pki {
        dir: tempfile::TempDir,
    }

    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("other.key"), other.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("garbage.pem"), "hello\n").unwrap();
        Pki { dir }
    }

    #[test]
    fn good_files_load_and_configure_servers_and_clients() {
        let p = pki();
        let d = p.dir.path();
        assert!(TlsFiles::default().load().unwrap().is_none());
        let tls = files(d, Some("cert.pem"), Some("key.pem"), Some("ca.pem"))
            .load()
            .unwrap()
            .unwrap();
        assert!(tls.serves());
        assert!(tls.server_config().is_some());
        let _ = tls.client_config("localhost");
        let client_only = files(d, None, None, Some("ca.pem"))
            .load()
            .unwrap()
            .unwrap();
        assert!(!client_only.serves() && client_only.server_config().is_none());
        // The key material never shows in Debug.
        let shown = format!("{tls:?}");
        assert!(
            shown.contains("cert.pem") && !shown.contains("PRIVATE"),
            "{shown}"
        );
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_what_is_expected() {
        let p = pki();
        let d = p.dir.path();
        let err = |f: TlsFiles| f.load().unwrap_err().to_string();
        let e = err(files(d, Some("cert.pem"), None, None));
        assert!(e.contains("--tls-cert needs --tls-key"), "{e}");
        let e = err(files(d, None, Some("key.pem"), None));
        assert!(e.contains("--tls-key needs --tls-cert"), "{e}");
        let e = err(files(d, Some("missing.pem"), Some("key.pem"), None));
        assert!(
            e.contains("--tls-cert") && e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
        let e = err(files(d, Some("garbage.pem"), Some("key.pem"), None));
        assert!(
            e.contains("garbage.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = err(files(d, Some("cert.pem"), Some("cert.pem"), None));
        assert!(
            e.contains("--tls-key") && e.contains("no private key"),
            "{e}"
        );
        let e = err(files(d, Some("cert.pem"), Some("other.key"), None));
        assert!(
            e.contains("other.key") && e.contains("not the private key of the certificate"),
            "{e}"
        );
        let e = err(files(d, None, None, Some("key.pem")));
        assert!(
            e.contains("--tls-ca") && e.contains("no certificate"),
            "{e}"
        );
    }

    #[test]
    fn endpoints_take_http_and_https_only() {
        assert!(endpoint("http://127.0.0.1:7000").is_ok());
        assert!(endpoint("https://127.0.0.1:7000").is_ok());
        let e = endpoint("ftp://127.0.0.1:7000").unwrap_err().to_string();
        assert!(e.contains("scheme `ftp`") && e.contains("https://"), "{e}");
        assert!(endpoint("not a url").is_err());
    }

    #[test]
    fn child_env_names_every_file_by_absolute_path() {
        let f = TlsFiles {
            cert: Some("c.pem".into()),
            key: None,
            ca: Some("/abs/ca.pem".into()),
            server_name: Some("chorus".into()),
        };
        let env = f.child_env();
        assert_eq!(env.len(), 3);
        assert_eq!(env[0].0, CERT_ENV);
        assert!(Path::new(&env[0].1).is_absolute());
        assert_eq!(env[1], (CA_ENV, "/abs/ca.pem".into()));
        assert_eq!(env[2], (SERVER_NAME_ENV, "chorus".into()));
    }
}
