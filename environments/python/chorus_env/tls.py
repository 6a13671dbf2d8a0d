"""TLS for the SDK's server and client, with the settings Chorus' own services take.

A process has one TLS identity and one trust setting (:class:`TlsFiles`), given as arguments
or by the environment variables a Chorus service hands the processes it starts
(``CHORUS_TLS_CERT``, ``CHORUS_TLS_KEY``, ``CHORUS_TLS_CA``, ``CHORUS_TLS_SERVER_NAME``):

- with a certificate and key, a server speaks TLS and its URL is ``https://``; with a CA as
  well it is mutual TLS: a client must present a certificate signed by that CA, or its
  handshake fails;
- a client of an ``https://`` URL trusts the CA (else the system's roots) and presents the
  certificate and key, when given, as its identity; ``http://`` stays plain text.
"""

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import grpc

CERT_ENV = "CHORUS_TLS_CERT"
KEY_ENV = "CHORUS_TLS_KEY"
CA_ENV = "CHORUS_TLS_CA"
SERVER_NAME_ENV = "CHORUS_TLS_SERVER_NAME"


def _read(path: Optional[str], flag: str) -> Optional[bytes]:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path}: not a PEM file (no `-----BEGIN` line)")
    return data


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS identity (``cert``, ``key``) and trust (``ca``); ``server_name`` is
    the name a client checks in the server's certificate instead of the URL's host."""

    cert: Optional[str] = None
    key: Optional[str] = None
    ca: Optional[str] = None
    server_name: Optional[str] = None

    @classmethod
    def from_env(cls) -> "TlsFiles":
        """The settings a Chorus service handed this process, if any."""
        return cls(cert=os.environ.get(CERT_ENV) or None, key=os.environ.get(KEY_ENV) or None,
                   ca=os.environ.get(CA_ENV) or None,
                   server_name=os.environ.get(SERVER_NAME_ENV) or None)

    def or_env(self) -> "TlsFiles":
        """These settings, with the environment's for whatever is not given."""
        env = TlsFiles.from_env()
        return TlsFiles(cert=self.cert or env.cert, key=self.key or env.key,
                        ca=self.ca or env.ca, server_name=self.server_name or env.server_name)

    def _identity(self) -> Tuple[Optional[bytes], Optional[bytes]]:
        if bool(self.cert) != bool(self.key):
            given, missing = ("--tls-cert", "--tls-key") if self.cert else ("--tls-key", "--tls-cert")
            raise ValueError(f"{given} needs {missing}: a TLS identity is a certificate and its key")
        return _read(self.cert, "--tls-cert"), _read(self.key, "--tls-key")

    @property
    def serves(self) -> bool:
        """Whether a server with these settings speaks TLS."""
        return bool(self.cert and self.key)

    def server_credentials(self) -> Optional[grpc.ServerCredentials]:
        """Credentials for a server: ``None`` for plain text (no certificate), mutual TLS with
        a CA. A CA without a certificate is refused: it would require client certificates of a
        server that cannot speak TLS."""
        cert, key = self._identity()
        ca = _read(self.ca, "--tls-ca")
        if cert is None:
            if ca is not None:
                raise ValueError("--tls-ca makes a server require client certificates signed by "
                                 "that CA: give the server's own --tls-cert and --tls-key too")
            return None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)

    def channel(self, url: str, options: Sequence[Tuple[str, object]] = ()) -> grpc.Channel:
        """A channel to a Chorus service at ``url`` (``http://host:port`` or
        ``https://host:port``)."""
        if url.startswith("http://"):
            return grpc.insecure_channel(url.removeprefix("http://"), options=list(options))
        if not url.startswith("https://"):
            raise ValueError(f"`{url}` is not a service address; allowed: http://host:port or "
                             "https://host:port")
        cert, key = self._identity()
        credentials = grpc.ssl_channel_credentials(root_certificates=_read(self.ca, "--tls-ca"),
                                                   private_key=key, certificate_chain=cert)
        options = list(options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(url.removeprefix("https://").rstrip("/"), credentials,
                                   options=options)


def add_port(server: grpc.Server, address: str, tls: TlsFiles) -> Tuple[int, str]:
    """Binds ``server`` to ``address`` (port 0 picks one), with TLS when ``tls`` has an
    identity; returns the port and the URL scheme (``http`` or ``https``)."""
    credentials = tls.server_credentials()
    if credentials is None:
        return server.add_insecure_port(address), "http"
    return server.add_secure_port(address, credentials), "https"


def add_arguments(parser) -> None:
    """``--tls-cert``, ``--tls-key``, ``--tls-ca``, ``--tls-server-name`` on a command line, as
    Chorus' commands take them (defaults: the ``CHORUS_TLS_*`` environment variables)."""
    parser.add_argument("--tls-cert", help="this process's TLS certificate chain (PEM); with "
                        "--tls-key it serves TLS and presents it to https:// services "
                        f"(default: ${CERT_ENV})")
    parser.add_argument("--tls-key", help=f"the private key of --tls-cert (PEM; default: ${KEY_ENV})")
    parser.add_argument("--tls-ca", help="CA certificates (PEM) to trust for https:// services; "
                        "when serving, clients must present a certificate signed by them "
                        f"(mutual TLS; default: ${CA_ENV})")
    parser.add_argument("--tls-server-name", help="the name to check in servers' certificates "
                        f"instead of the URL's host (default: ${SERVER_NAME_ENV})")


def from_arguments(args) -> TlsFiles:
    """The settings of :func:`add_arguments`' flags, with the environment's for those not
    given."""
    return TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca,
                    server_name=args.tls_server_name).or_env()
