//! One SMPP session over TCP (or TLS), on `rusmpp`'s PDU codec: requests
//! carry sequence numbers and are matched with their responses, several at
//! once; what the SMSC sends unasked (receipts, unbind) goes to the owner;
//! `enquire_link` goes out on an interval and a session whose SMSC stops
//! answering ends. Every PDU written is flushed at once.
//!
//! (`rusmppc` does this too, but its connection task gives up after five
//! queued requests per wake-up without waking itself again, so a burst of
//! receipt acknowledgements could hold a `submit_sm` back until the next
//! keep-alive: tens of seconds.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use rusmpp::tokio_codec::CommandCodec;
use rusmpp::{Command, CommandStatus, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;

/// How long a request waits for its response.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the SMSC answered {0:?}")]
    Status(CommandStatus),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the session ended")]
    Ended,
    #[error("cannot connect: {0}")]
    Connect(String),
}

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Command>>>>;

/// A handle to a running session (cheap to clone).
#[derive(Clone, Debug)]
pub struct Session {
    out: mpsc::Sender<Command>,
    pending: Pending,
    sequence: Arc<AtomicU32>,
    ended: CancellationToken,
}

impl Session {
    /// Connects to `url` (`smpp://host:port`, or `smpps://` over TLS with
    /// the system's roots). Requests the SMSC sends go to `incoming`; the
    /// session ends at `cancel`, when the connection drops or when the SMSC
    /// leaves an `enquire_link` unanswered.
    pub async fn connect(
        url: &str,
        enquire_link: Duration,
        incoming: mpsc::Sender<Command>,
        cancel: CancellationToken,
    ) -> Result<Self, SessionError> {
        let (tls, address) = match url.split_once("://") {
            Some(("smpps" | "ssmpp", address)) => (true, address),
            Some((_, address)) => (false, address),
            None => (false, url),
        };
        let address = address.trim_end_matches('/');
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(address))
            .await
            .map_err(|_| SessionError::Connect("timed out".into()))?
            .map_err(|error| SessionError::Connect(error.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let ended = cancel.child_token();
        let session = Self {
            out: mpsc::channel(1).0,
            pending: Arc::default(),
            sequence: Arc::new(AtomicU32::new(1)),
            ended: ended.clone(),
        };
        if tls {
            let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
            let connector = chukei_proto::tls::system_roots_connector()
                .ok_or_else(|| SessionError::Connect("no trusted root certificates".into()))?;
            let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                .map_err(|error| SessionError::Connect(error.to_string()))?;
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|error| SessionError::Connect(error.to_string()))?;
            Ok(session.run(stream, enquire_link, incoming))
        } else {
            Ok(session.run(tcp, enquire_link, incoming))
        }
    }

    fn run<S>(mut self, stream: S, enquire_link: Duration, incoming: mpsc::Sender<Command>) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let (out, to_write) = mpsc::channel(256);
        self.out = out;
        tokio::spawn(write_all(write, to_write, self.ended.clone()));
        tokio::spawn(read_all(read, self.clone(), incoming));
        tokio::spawn(keep_alive(self.clone(), enquire_link));
        self
    }

    /// Sends `pdu` and waits for its response (an OK status, or the status
    /// as the error).
    pub async fn request(&self, pdu: impl Into<Pdu>) -> Result<Command, SessionError> {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) & 0x7FFF_FFFF;
        let (answer, answered) = oneshot::channel();
        self.pending.lock().await.insert(sequence, answer);
        let command = Command::new(CommandStatus::EsmeRok, sequence, pdu);
        if self.out.send(command).await.is_err() {
            self.pending.lock().await.remove(&sequence);
            return Err(SessionError::Ended);
        }
        let response = tokio::select! {
            () = self.ended.cancelled() => Err(SessionError::Ended),
            response = tokio::time::timeout(RESPONSE_TIMEOUT, answered) => match response {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(_)) => Err(SessionError::Ended),
                Err(_) => Err(SessionError::Timeout(RESPONSE_TIMEOUT)),
            },
        };
        self.pending.lock().await.remove(&sequence);
        let response = response?;
        match response.status() {
            CommandStatus::EsmeRok => Ok(response),
            status => Err(SessionError::Status(status)),
        }
    }

    /// Answers the SMSC's request `sequence` with `pdu`.
    pub async fn respond(&self, sequence: u32, pdu: impl Into<Pdu>) -> Result<(), SessionError> {
        let command = Command::new(CommandStatus::EsmeRok, sequence, pdu);
        self.out
            .send(command)
            .await
            .map_err(|_| SessionError::Ended)
    }

    /// Ends the session (the connection closes).
    pub fn end(&self) {
        self.ended.cancel();
    }

    /// Completes when the session has ended.
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }
}

/// Writes each command as it comes, flushed at once.
async fn write_all<W: AsyncWrite + Unpin>(
    mut write: W,
    mut commands: mpsc::Receiver<Command>,
    ended: CancellationToken,
) {
    let mut codec = CommandCodec::new();
    let mut buffer = BytesMut::with_capacity(4096);
    loop {
        let command = tokio::select! {
            () = ended.cancelled() => break,
            command = commands.recv() => match command {
                Some(command) => command,
                None => break,
            },
        };
        buffer.clear();
        if codec.encode(&command, &mut buffer).is_err() {
            tracing::warn!(id = ?command.id(), "an SMPP command could not be encoded");
            continue;
        }
        // Whatever else is queued goes in the same write.
        while let Ok(more) = commands.try_recv() {
            if codec.encode(&more, &mut buffer).is_err() {
                tracing::warn!(id = ?more.id(), "an SMPP command could not be encoded");
            }
        }
        if write.write_all(&buffer).await.is_err() || write.flush().await.is_err() {
            break;
        }
    }
    let _ = write.shutdown().await;
    ended.cancel();
}

/// Reads commands until the connection ends: responses to their requests,
/// `enquire_link` answered here, everything else to `incoming`.
async fn read_all<R: AsyncRead + Unpin>(
    read: R,
    session: Session,
    incoming: mpsc::Sender<Command>,
) {
    let mut frames = FramedRead::new(read, CommandCodec::new());
    loop {
        let frame = tokio::select! {
            () = session.ended.cancelled() => break,
            frame = frames.next() => frame,
        };
        let command = match frame {
            Some(Ok(command)) => command,
            Some(Err(error)) => {
                tracing::warn!(%error, "unreadable SMPP command; ending the session");
                break;
            }
            None => break,
        };
        let sequence = command.sequence_number();
        if u32::from(command.id()) & 0x8000_0000 != 0 {
            if let Some(answer) = session.pending.lock().await.remove(&sequence) {
                let _ = answer.send(command);
            }
            continue;
        }
        if matches!(command.pdu(), Some(Pdu::EnquireLink)) {
            let _ = session.respond(sequence, Pdu::EnquireLinkResp).await;
            continue;
        }
        if incoming.send(command).await.is_err() {
            break;
        }
    }
    session.ended.cancel();
}

/// An `enquire_link` every `interval`; unanswered, the session ends.
async fn keep_alive(session: Session, interval: Duration) {
    loop {
        tokio::select! {
            () = session.ended.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match session.request(Pdu::EnquireLink).await {
            Ok(_) | Err(SessionError::Status(_)) => {}
            Err(error) => {
                tracing::warn!(%error, "the SMSC did not answer enquire_link; ending the session");
                session.end();
                return;
            }
        }
    }
}
