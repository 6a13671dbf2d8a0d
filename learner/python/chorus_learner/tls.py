"""TLS for the learner's server and its client of the orchestrator, with the flags and
environment variables of Chorus' own services (``--tls-cert``/``CHORUS_TLS_CERT``,
``--tls-key``/``CHORUS_TLS_KEY``, ``--tls-ca``/``CHORUS_TLS_CA``,
``--tls-server-name``/``CHORUS_TLS_SERVER_NAME``): with a certificate and key the learner serves
``https://``, with a CA as well it requires client certificates signed by it (mutual TLS); it
reaches an ``https://`` orchestrator trusting the CA (else the system's roots) and presenting
its certificate."""

import os

import grpc

FLAGS = (("cert", "CHORUS_TLS_CERT", "this learner's TLS certificate chain (PEM); with --tls-key "
          "it serves https:// and presents it to an https:// orchestrator"),
         ("key", "CHORUS_TLS_KEY", "the private key of --tls-cert (PEM)"),
         ("ca", "CHORUS_TLS_CA", "CA certificates (PEM): clients must present a certificate "
          "signed by them (mutual TLS), and an https:// orchestrator's is checked against them"),
         ("server_name", "CHORUS_TLS_SERVER_NAME", "the name to check in the orchestrator's "
          "certificate instead of its URL's host"))


def add_arguments(parser):
    for name, env, text in FLAGS:
        parser.add_argument("--tls-" + name.replace("_", "-"), dest="tls_" + name,
                            default=os.environ.get(env) or None, help=f"{text} (default: ${env})")


def _pem(path, flag):
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SystemExit(f"{flag} {path}: cannot read it: {e.strerror}")
    if b"-----BEGIN " not in data:
        raise SystemExit(f"{flag} {path}: not a PEM file (no `-----BEGIN` line)")
    return data


class Tls:
    """The TLS settings of a learner process, read once from its arguments."""

    def __init__(self, args):
        if bool(args.tls_cert) != bool(args.tls_key):
            raise SystemExit("--tls-cert and --tls-key go together: a TLS identity is a "
                             "certificate and its key")
        self.cert = _pem(args.tls_cert, "--tls-cert")
        self.key = _pem(args.tls_key, "--tls-key")
        self.ca = _pem(args.tls_ca, "--tls-ca")
        self.server_name = args.tls_server_name
        if self.ca is not None and self.cert is None:
            raise SystemExit("--tls-ca makes the learner require client certificates signed by "
                             "that CA: give its own --tls-cert and --tls-key too")

    @property
    def scheme(self):
        return "https" if self.cert else "http"

    def add_port(self, server, address):
        if self.cert is None:
            return server.add_insecure_port(address)
        credentials = grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                                  require_client_auth=self.ca is not None)
        return server.add_secure_port(address, credentials)

    def channel(self, url):
        if url.startswith("http://"):
            return grpc.insecure_channel(url.removeprefix("http://"))
        if not url.startswith("https://"):
            raise SystemExit(f"--orchestrator {url}: allowed: http://host:port or https://host:port")
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                                   certificate_chain=self.cert)
        return grpc.secure_channel(url.removeprefix("https://").rstrip("/"), credentials,
                                   options=options)
