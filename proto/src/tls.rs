//! TLS on every hop (rustls through tonic), and mutual TLS where a peer's
//! role matters. Each process has one certificate, used both as its server
//! identity and as its client identity when the peer asks for one, and one
//! set of trusted CAs for the servers it calls over `https://`. A server
//! given `--tls-client-ca` verifies the certificates clients present; the
//! handlers whose callers have a role (the relay's CarrierIngress, a
//! carrier's Deliver stream) then require one naming that role: a DNS name
//! `<carrier_id>.carrier.chukei` or `relay.chukei` in its subject
//! alternative names. Other callers (enterprises, terminals) need none.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The DNS name a relay's client certificate carries.
pub const RELAY_NAME: &str = "relay.chukei";

/// The DNS name carrier `carrier_id`'s client certificate carries.
pub fn carrier_name(carrier_id: &str) -> String {
    format!("{carrier_id}.carrier.chukei")
}

/// TLS settings of one process.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsArgs {
    /// PEM certificate chain this process presents: as its servers'
    /// identity, and as its client identity to peers that verify clients.
    /// Unset: its servers speak plain HTTP/2.
    #[arg(long, env = "CHUKEI_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "CHUKEI_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates trusted for the servers this process calls over
    /// https:// (unset: the system's roots are not used; https calls fail).
    #[arg(long, env = "CHUKEI_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// PEM CA certificates client certificates are verified against (mutual
    /// TLS). Callers with a role must then present one naming it.
    #[arg(long, env = "CHUKEI_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

fn read(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| anyhow::anyhow!("{flag}: {}: {error}", path.display()))
}

impl TlsArgs {
    /// Whether callers' certificates are verified (and roles required).
    pub fn verifies_clients(&self) -> bool {
        self.tls_client_ca.is_some()
    }

    /// The servers' TLS settings; `None`: plain HTTP/2. Client certificates
    /// are optional at the handshake (enterprises and terminals present
    /// none) but always verified when presented; handlers require them.
    pub fn server(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
        ));
        if let Some(ca) = &self.tls_client_ca {
            config = config
                .client_ca_root(Certificate::from_pem(read("--tls-client-ca", ca)?))
                .client_auth_optional(true);
        }
        Ok(Some(config))
    }

    /// An endpoint for `url`: over TLS (trusting --tls-ca, presenting
    /// --tls-cert) when it is `https://`.
    pub fn endpoint(&self, url: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_owned())?;
        if !url.starts_with("https://") {
            return Ok(endpoint);
        }
        let mut config = ClientTlsConfig::new();
        match &self.tls_ca {
            Some(ca) => {
                config = config.ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?))
            }
            None => anyhow::bail!("--tls-ca: needed to call {url} over TLS"),
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config = config.identity(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ));
        }
        Ok(endpoint.tls_config(config)?)
    }
}

/// Checks that the caller of `request` presented a (verified) client
/// certificate naming `name`; the error says what is missing.
pub fn require_peer<T>(request: &tonic::Request<T>, name: &str) -> Result<(), tonic::Status> {
    let Some(certs) = request.peer_certs() else {
        return Err(tonic::Status::unauthenticated(
            "client certificate: required (mutual TLS)",
        ));
    };
    let Some(leaf) = certs.first() else {
        return Err(tonic::Status::unauthenticated(
            "client certificate: required (mutual TLS)",
        ));
    };
    if names(leaf.as_ref(), name) {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied(format!(
            "client certificate: does not name {name}"
        )))
    }
}

/// Whether a DER certificate names `name` among its subject alternative
/// names (its chain was verified at the handshake).
fn names(der: &[u8], name: &str) -> bool {
    let der = rustls_pki_types::CertificateDer::from(der);
    let (Ok(cert), Ok(dns)) = (
        webpki::EndEntityCert::try_from(&der),
        rustls_pki_types::DnsName::try_from(name),
    ) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&rustls_pki_types::ServerName::DnsName(dns))
        .is_ok()
}

/// A TLS client for the plain-TCP protocols beside gRPC (webhooks, SMPP)
/// trusting the system's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR` are
/// honoured); `None` when there are none: connections over TLS then fail
/// with that reason.
pub fn system_roots_connector() -> Option<tokio_rustls::TlsConnector> {
    use std::sync::Arc;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::warn!("no trusted root certificates found: TLS to webhooks and SMSCs will fail");
        return None;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
