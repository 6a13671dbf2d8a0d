//! Certificates made at test time (rcgen), for the TLS tests.

use super::Harness;

/// The PEM files of the test's PKI, written into the harness's directory.
pub struct Pki;

impl Pki {
    /// Writes `ca.pem`; `node.pem`/`node.key` (signed by the CA, for 127.0.0.1 and localhost,
    /// server and client use); `client.pem`/`client.key` (signed by the CA, client use);
    /// `stranger.pem`/`stranger.key` (signed by another CA); `self.pem`/`self.key` (self-signed).
    pub fn write(h: &Harness) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
        };
        let leaf = |names: &[&str], eku: Vec<ExtendedKeyUsagePurpose>| {
            let mut p =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .unwrap();
            p.distinguished_name.push(DnType::CommonName, names[0]);
            p.extended_key_usages = eku;
            (p, KeyPair::generate().unwrap())
        };
        let write = |name: &str, text: String| std::fs::write(h.path(name), text).unwrap();
        let chorus_ca = ca("chorus test CA");
        let other_ca = ca("another CA");
        write("ca.pem", chorus_ca.pem());
        let both = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let client = vec![ExtendedKeyUsagePurpose::ClientAuth];
        for (name, names, eku, issuer) in [
            ("node", &["127.0.0.1", "localhost"][..], both, &chorus_ca),
            ("client", &["client"][..], client.clone(), &chorus_ca),
            ("stranger", &["client"][..], client.clone(), &other_ca),
            (
                "named",
                &["chorus.internal"][..],
                vec![ExtendedKeyUsagePurpose::ServerAuth],
                &chorus_ca,
            ),
        ] {
            let (params, key) = leaf(names, eku);
            let cert = params.signed_by(&key, issuer).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        let (params, key) = leaf(&["client"], client);
        write("self.pem", params.self_signed(&key).unwrap().pem());
        write("self.key", key.serialize_pem());
        Pki
    }

    /// The flags of a service (or client) with the node identity and mutual TLS.
    pub fn node_flags(&self) -> [&'static str; 6] {
        [
            "--tls-cert",
            "node.pem",
            "--tls-key",
            "node.key",
            "--tls-ca",
            "ca.pem",
        ]
    }
}
