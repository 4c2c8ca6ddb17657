//! SMS to an SMSC over SMPP (the ESME side, on `rusmpp`'s PDUs; the
//! session itself is [`session`]): one transceiver bind kept up —
//! `enquire_link` keep-alives, reconnect and rebind with backoff —, `submit_sm` with a window of answers awaited at
//! once and an optional rate, backing off when the SMSC says
//! `ESME_RTHROTTLED` or `ESME_RMSGQFUL`. Each part of a long text goes with
//! a concatenation header (`channels::sms_payload`: GSM 7-bit or UCS-2),
//! asking for a delivery receipt. Receipts come back as `deliver_sm` with a
//! receipt `esm_class`; their id and state are read from the
//! `receipted_message_id`/`message_state` TLVs or, failing those, from the
//! receipt text (`id:… stat:DELIVRD err:000`), and acknowledged only once
//! stored. A status other than OK or a throttle refuses the delivery: a
//! FAILED receipt, the status named in the carrier's log and metrics.

use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusmpp::pdus::{BindTransceiver, DeliverSm, DeliverSmResp, SubmitSm};
use rusmpp::tlvs::TlvValue;
use rusmpp::types::{COctetString, OctetString};
use rusmpp::values::{
    DataCoding, EsmClass, InterfaceVersion, Npi, RegisteredDelivery, ServiceType, Ton,
};
use rusmpp::{Command, CommandStatus, Pdu};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub mod session;

use session::{Session, SessionError};

use super::{GatewayArgs, GatewayMetrics, Handed, Outcome, Report};
use crate::Shared;
use crate::channels::{Rendered, sms_payload};
use crate::model::Outgoing;

/// An SMSC's connection settings, checked.
#[derive(Clone, Debug)]
pub struct SmppSettings {
    url: String,
    system_id: String,
    password: String,
    system_type: String,
    source_addr: String,
    window: usize,
    max_per_sec: u32,
    enquire_link: Duration,
}

impl SmppSettings {
    /// The `--smpp-*` flags, each error naming its flag.
    pub fn from_args(args: &GatewayArgs, url: &str) -> anyhow::Result<Self> {
        let scheme_ok = ["smpp://", "smpps://", "ssmpp://"]
            .iter()
            .any(|scheme| url.starts_with(scheme) && url.len() > scheme.len());
        if !scheme_ok {
            anyhow::bail!("--smpp-url: must be smpp://host:port or smpps://host:port");
        }
        let limit = |flag: &str, value: &str, max: usize| -> anyhow::Result<()> {
            if value.len() > max || !value.is_ascii() {
                anyhow::bail!("{flag}: at most {max} ASCII characters (SMPP 3.4)");
            }
            Ok(())
        };
        if args.smpp_system_id.is_empty() {
            anyhow::bail!("--smpp-system-id: required with --smpp-url");
        }
        limit("--smpp-system-id", &args.smpp_system_id, 15)?;
        limit("--smpp-password", &args.smpp_password, 8)?;
        limit("--smpp-system-type", &args.smpp_system_type, 12)?;
        limit("--smpp-source-addr", &args.smpp_source_addr, 20)?;
        if args.smpp_source_addr.is_empty() {
            anyhow::bail!("--smpp-source-addr: must not be empty");
        }
        if !(1..=1000).contains(&args.smpp_window) {
            anyhow::bail!("--smpp-window: must be 1 to 1000");
        }
        if args.smpp_enquire_link_secs == 0 {
            anyhow::bail!("--smpp-enquire-link-secs: must be positive");
        }
        Ok(Self {
            url: url.to_owned(),
            system_id: args.smpp_system_id.clone(),
            password: args.smpp_password.clone(),
            system_type: args.smpp_system_type.clone(),
            source_addr: args.smpp_source_addr.clone(),
            window: args.smpp_window as usize,
            max_per_sec: args.smpp_max_per_sec,
            enquire_link: Duration::from_secs(args.smpp_enquire_link_secs),
        })
    }
}

/// The SMS gateway: a handle to the bind its task keeps up.
#[derive(Clone, Debug)]
pub struct Smpp {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: SmppSettings,
    /// The bound session, while there is one.
    session: watch::Sender<Option<Session>>,
    /// Not before then, after the SMSC asked to slow down; and how long the
    /// next such pause lasts.
    throttle: Mutex<(Instant, Duration)>,
    /// The next instant a submit may go, under `--smpp-max-per-sec`.
    paced: tokio::sync::Mutex<Instant>,
    /// submit_sm awaiting their answer (the window in use).
    in_flight: AtomicI64,
    metrics: GatewayMetrics,
}

const FIRST_PAUSE: Duration = Duration::from_millis(200);
const LONGEST_PAUSE: Duration = Duration::from_secs(30);
const LONGEST_REBIND: Duration = Duration::from_secs(10);

impl Smpp {
    /// Starts the task that binds and stays bound (a task of `shared`'s);
    /// receipts go to `reports`.
    pub fn start(shared: &Shared, settings: SmppSettings, reports: mpsc::Sender<Report>) -> Self {
        let inner = Arc::new(Inner {
            settings,
            session: watch::channel(None).0,
            throttle: Mutex::new((Instant::now(), FIRST_PAUSE)),
            paced: tokio::sync::Mutex::new(Instant::now()),
            in_flight: AtomicI64::new(0),
            metrics: shared.metrics.gateway.clone(),
        });
        shared
            .tasks
            .spawn(stay_bound(inner.clone(), reports, shared.cancel.clone()));
        Self { inner }
    }

    pub fn window(&self) -> usize {
        self.inner.settings.window
    }

    /// How long deliveries put off wait: what is left of a throttle pause.
    pub fn pause(&self) -> Duration {
        let (until, _) = *self.inner.throttle.lock().expect("throttle lock");
        until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100))
    }

    /// Submits each part of the delivery; the ids the SMSC gave them.
    pub async fn hand(&self, outgoing: &Outgoing, rendered: &Rendered) -> Handed {
        let Some(session) = self.inner.session.borrow().clone() else {
            return Handed::Later("not bound".into());
        };
        if self.inner.throttle.lock().expect("throttle lock").0 > Instant::now() {
            return Handed::Later("throttled".into());
        }
        let payload = sms_payload(&rendered.sms_segments, outgoing.delivery_id as u8);
        let mut ids = Vec::with_capacity(payload.parts.len());
        for part in payload.parts {
            let submit = match self.submit_sm(
                &outgoing.contact.phone_number,
                payload.data_coding,
                payload.udh,
                part,
            ) {
                Ok(submit) => submit,
                Err(error) => return Handed::Refused(error),
            };
            self.pace().await;
            self.window_in_use(1);
            let answer = session.request(submit).await;
            self.window_in_use(-1);
            let status = match answer {
                Ok(response) => {
                    let id = match response.pdu() {
                        Some(Pdu::SubmitSmResp(response)) => response.message_id().as_str(),
                        _ => "",
                    };
                    if id.is_empty() {
                        self.count("no-message-id");
                        return Handed::Later("a submit_sm_resp without a message id".into());
                    }
                    ids.push(id.to_owned());
                    self.count("ESME_ROK");
                    self.speed_up();
                    continue;
                }
                Err(SessionError::Status(status)) => status,
                Err(error) => return Handed::Later(error.to_string()),
            };
            let name = status_name(status);
            self.count(&name);
            return if matches!(
                status,
                CommandStatus::EsmeRthrottled | CommandStatus::EsmeRmsgqful
            ) {
                self.slow_down();
                Handed::Later(name)
            } else {
                Handed::Refused(name)
            };
        }
        Handed::Accepted(ids)
    }

    fn submit_sm(
        &self,
        phone_number: &str,
        data_coding: u8,
        udh: bool,
        part: Vec<u8>,
    ) -> Result<SubmitSm, String> {
        let settings = &self.inner.settings;
        let destination = phone_number.trim_start_matches('+');
        let destination = COctetString::from_str(destination)
            .map_err(|_| "the subscriber's phone number is not an SMPP address".to_owned())?;
        let source = COctetString::from_str(&settings.source_addr)
            .map_err(|_| "--smpp-source-addr is not an SMPP address".to_owned())?;
        let numeric = settings
            .source_addr
            .trim_start_matches('+')
            .bytes()
            .all(|b| b.is_ascii_digit());
        let (source_ton, source_npi) = if numeric {
            (Ton::International, Npi::Isdn)
        } else {
            (Ton::Alphanumeric, Npi::Unknown)
        };
        let message = OctetString::from_vec(part).map_err(|_| "an SMS part exceeds 255 octets")?;
        Ok(SubmitSm::builder()
            .service_type(ServiceType::default())
            .source_addr_ton(source_ton)
            .source_addr_npi(source_npi)
            .source_addr(source)
            .dest_addr_ton(Ton::International)
            .dest_addr_npi(Npi::Isdn)
            .destination_addr(destination)
            .esm_class(EsmClass::from(if udh { 0x40 } else { 0x00 }))
            // A receipt on final delivery, success or failure.
            .registered_delivery(RegisteredDelivery::from(0x01))
            .data_coding(DataCoding::from(data_coding))
            .short_message(message)
            .build())
    }

    /// Waits for the submit's turn under `--smpp-max-per-sec`.
    async fn pace(&self) {
        let per_sec = self.inner.settings.max_per_sec;
        if per_sec == 0 {
            return;
        }
        let mut next = self.inner.paced.lock().await;
        let now = Instant::now();
        if *next > now {
            tokio::time::sleep_until(*next).await;
        }
        *next = (*next).max(now) + Duration::from_secs(1) / per_sec;
    }

    fn window_in_use(&self, change: i64) {
        let now = self.inner.in_flight.fetch_add(change, Ordering::Relaxed) + change;
        self.inner
            .metrics
            .in_flight
            .set(&[("gateway", "smpp")], now as f64);
    }

    /// Pauses every submit; a throttle answered to a submit sent before
    /// the pause began (several are in flight at once) does not lengthen it.
    fn slow_down(&self) {
        let mut throttle = self.inner.throttle.lock().expect("throttle lock");
        if throttle.0 > Instant::now() {
            return;
        }
        let pause = throttle.1;
        throttle.0 = Instant::now() + pause;
        throttle.1 = (pause * 2).min(LONGEST_PAUSE);
        tracing::info!(
            pause_ms = pause.as_millis() as u64,
            "the SMSC asked to slow down"
        );
    }

    fn speed_up(&self) {
        self.inner.throttle.lock().expect("throttle lock").1 = FIRST_PAUSE;
    }

    fn count(&self, status: &str) {
        self.inner
            .metrics
            .submits
            .inc(&[("gateway", "smpp"), ("status", status)]);
    }
}

/// The SMPP name of a status, e.g. `ESME_RTHROTTLED`.
pub fn status_name(status: CommandStatus) -> String {
    let debug = format!("{status:?}");
    match debug.strip_prefix("Esme") {
        Some(rest) => format!("ESME_{}", rest.to_ascii_uppercase()),
        None => format!("0x{:08X}", u32::from(status)),
    }
}

/// Binds, serves the session until it ends, binds again (with backoff)
/// until `cancel`, then unbinds.
async fn stay_bound(inner: Arc<Inner>, reports: mpsc::Sender<Report>, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        let (incoming, received) = mpsc::channel(1024);
        match bind(&inner.settings, incoming, &cancel).await {
            Ok(session) => {
                inner
                    .metrics
                    .binds
                    .inc(&[("gateway", "smpp"), ("outcome", "bound")]);
                tracing::info!("bound to the SMSC");
                backoff = Duration::from_millis(100);
                inner.session.send_replace(Some(session.clone()));
                serve(&session, received, &reports, &cancel).await;
                inner.session.send_replace(None);
                if cancel.is_cancelled() {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), session.request(Pdu::Unbind))
                            .await;
                    session.end();
                    break;
                }
                session.end();
                tracing::warn!("the SMSC session ended; binding again");
            }
            Err(error) => {
                inner
                    .metrics
                    .binds
                    .inc(&[("gateway", "smpp"), ("outcome", "failed")]);
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "could not bind to the SMSC");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(LONGEST_REBIND);
    }
}

async fn bind(
    settings: &SmppSettings,
    incoming: mpsc::Sender<Command>,
    cancel: &CancellationToken,
) -> anyhow::Result<Session> {
    let session = Session::connect(
        &settings.url,
        settings.enquire_link,
        incoming,
        cancel.clone(),
    )
    .await?;
    let bind = BindTransceiver::builder()
        .system_id(COctetString::from_str(&settings.system_id)?)
        .password(COctetString::from_str(&settings.password)?)
        .system_type(COctetString::from_str(&settings.system_type)?)
        .interface_version(InterfaceVersion::Smpp3_4)
        .addr_ton(Ton::Unknown)
        .addr_npi(Npi::Unknown)
        .address_range(COctetString::empty())
        .build();
    match session.request(bind).await {
        Ok(_) => Ok(session),
        Err(error) => {
            session.end();
            match error {
                SessionError::Status(status) => {
                    anyhow::bail!("the SMSC refused the bind: {}", status_name(status))
                }
                error => Err(error.into()),
            }
        }
    }
}

/// Takes what the SMSC sends until the session ends: receipts go to
/// `reports` and are acknowledged once stored; other messages are
/// acknowledged at once (mobile-originated messages are not taken here).
async fn serve(
    session: &Session,
    mut incoming: mpsc::Receiver<Command>,
    reports: &mpsc::Sender<Report>,
    cancel: &CancellationToken,
) {
    loop {
        let command = tokio::select! {
            () = cancel.cancelled() => return,
            () = session.ended() => return,
            command = incoming.recv() => match command {
                Some(command) => command,
                None => return,
            },
        };
        let sequence = command.sequence_number();
        match command.pdu() {
            Some(Pdu::DeliverSm(deliver)) => match receipt_of(deliver) {
                Some(Receipt {
                    id,
                    outcome: Some(outcome),
                    error,
                }) => {
                    let (stored, is_stored) = oneshot::channel();
                    let report = Report::new(id, outcome, error, Some(stored));
                    if reports.send(report).await.is_err() {
                        return;
                    }
                    let session = session.clone();
                    tokio::spawn(async move {
                        // Unacknowledged (the carrier stopped first), the SMSC sends it again.
                        if is_stored.await.is_ok() {
                            let _ = session.respond(sequence, DeliverSmResp::default()).await;
                        }
                    });
                }
                _ => {
                    let _ = session.respond(sequence, DeliverSmResp::default()).await;
                }
            },
            Some(Pdu::Unbind) => {
                let _ = session.respond(sequence, Pdu::UnbindResp).await;
                return;
            }
            _ => tracing::debug!(id = ?command.id(), "an SMPP request this ESME does not take"),
        }
    }
}

/// A delivery receipt: the id it is about, and the outcome (`None`: an
/// intermediate state, e.g. ENROUTE, that changes nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub id: String,
    pub outcome: Option<Outcome>,
    /// The SMSC's state and error, for a failure.
    pub error: String,
}

/// The receipt a `deliver_sm` carries, if it is one.
pub fn receipt_of(deliver: &DeliverSm) -> Option<Receipt> {
    let esm_class = u8::from(deliver.esm_class);
    // Message type bits 2–5: 0b0001 is an SMSC delivery receipt.
    if esm_class & 0x3C != 0x04 {
        return None;
    }
    let mut id = None;
    let mut state = None;
    let mut network_error = None;
    for tlv in deliver.tlvs() {
        match tlv.value() {
            Some(TlvValue::ReceiptedMessageId(value)) => id = Some(value.as_str().to_owned()),
            Some(TlvValue::MessageState(value)) => state = Some(u8::from(*value)),
            Some(TlvValue::NetworkErrorCode(value)) => network_error = Some(format!("{value:?}")),
            _ => {}
        }
    }
    let text = String::from_utf8_lossy(deliver.short_message().as_ref()).into_owned();
    let field = |name: &str| -> Option<String> {
        let lower = text.to_ascii_lowercase();
        let start = lower.find(&format!("{name}:"))? + name.len() + 1;
        Some(
            text[start..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    let id = id.or_else(|| field("id"))?;
    let stat = field("stat").unwrap_or_default().to_ascii_uppercase();
    let err = field("err").unwrap_or_default();
    let outcome = match (state, stat.as_str()) {
        (Some(2), _) | (None, "DELIVRD") => Some(Outcome::Delivered),
        (Some(0 | 1 | 6), _) | (None, "ENROUTE" | "ACCEPTD" | "SCHEDULED") => None,
        (Some(_), _) | (None, _) => Some(Outcome::Failed),
    };
    let state_name = match state {
        Some(3) => "EXPIRED",
        Some(4) => "DELETED",
        Some(5) => "UNDELIV",
        Some(7) => "UNKNOWN",
        Some(8) => "REJECTD",
        Some(9) => "SKIPPED",
        _ if !stat.is_empty() => stat.as_str(),
        _ => "UNKNOWN",
    };
    let error = match outcome {
        Some(Outcome::Failed) => match (network_error, err.as_str()) {
            (Some(network), _) => format!("{state_name} {network}"),
            (None, "" | "000") => state_name.to_owned(),
            (None, err) => format!("{state_name} err:{err}"),
        },
        _ => String::new(),
    };
    Some(Receipt { id, outcome, error })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusmpp::values::MessageState;

    fn deliver(
        esm_class: u8,
        text: &str,
        tlvs: Vec<rusmpp::tlvs::MessageDeliveryRequestTlvValue>,
    ) -> DeliverSm {
        let mut deliver = DeliverSm::builder()
            .esm_class(EsmClass::from(esm_class))
            .short_message(OctetString::from_str(text).unwrap())
            .build();
        for tlv in tlvs {
            deliver.push_tlv(tlv);
        }
        deliver
    }

    #[test]
    fn receipts_are_read_from_the_text() {
        let receipt = receipt_of(&deliver(
            0x04,
            "id:0A1B sub:001 dlvrd:001 submit date:2612050101 done date:2612050101 stat:DELIVRD err:000 text:hello",
            vec![],
        ))
        .unwrap();
        assert_eq!(receipt.id, "0A1B");
        assert_eq!(receipt.outcome, Some(Outcome::Delivered));
        let failed = receipt_of(&deliver(0x04, "id:77 stat:UNDELIV err:011", vec![])).unwrap();
        assert_eq!(failed.outcome, Some(Outcome::Failed));
        assert_eq!(failed.error, "UNDELIV err:011");
        let passing = receipt_of(&deliver(0x04, "id:77 stat:ENROUTE err:000", vec![])).unwrap();
        assert_eq!(passing.outcome, None);
    }

    #[test]
    fn receipt_tlvs_win_over_the_text() {
        let receipt = receipt_of(&deliver(
            0x04,
            "id:1 stat:DELIVRD",
            vec![
                rusmpp::tlvs::MessageDeliveryRequestTlvValue::ReceiptedMessageId(
                    COctetString::from_str("ff").unwrap(),
                ),
                rusmpp::tlvs::MessageDeliveryRequestTlvValue::MessageState(MessageState::Rejected),
            ],
        ))
        .unwrap();
        assert_eq!(receipt.id, "ff");
        assert_eq!(receipt.outcome, Some(Outcome::Failed));
        assert_eq!(receipt.error, "REJECTD");
    }

    #[test]
    fn a_mobile_originated_message_is_no_receipt() {
        assert_eq!(
            receipt_of(&deliver(0x00, "id:1 stat:DELIVRD", vec![])),
            None
        );
    }

    #[test]
    fn statuses_have_their_smpp_names() {
        assert_eq!(
            status_name(CommandStatus::EsmeRthrottled),
            "ESME_RTHROTTLED"
        );
        assert_eq!(status_name(CommandStatus::EsmeRok), "ESME_ROK");
    }
}
