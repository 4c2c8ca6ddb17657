//! The kit's stand-ins for a carrier's peers: the relay's `CarrierIngress`,
//! a terminal that holds its response headers as grpcio does, and the
//! relay's end of a `Deliver` stream.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::carrier::v1 as pb;
use chukei_proto::clock::{Clock, to_timestamp};
use chukei_proto::deliver;
use chukei_proto::relay::v1 as relay;
use chukei_proto::terminal::v1 as terminal;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The kit's `CarrierIngress`: accepts everything, and tells the kit which
/// users' contracts arrived.
#[derive(Clone)]
pub(super) struct Ingress(pub(super) mpsc::UnboundedSender<String>);

#[tonic::async_trait]
impl relay::carrier_ingress_server::CarrierIngress for Ingress {
    async fn upsert_contracts(
        &self,
        request: Request<relay::UpsertContractsRequest>,
    ) -> Result<Response<relay::UpsertContractsResponse>, Status> {
        let contracts = request.into_inner().contracts;
        for contract in &contracts {
            let _ = self.0.send(contract.user_id.clone());
        }
        Ok(Response::new(relay::UpsertContractsResponse {
            upserted: contracts.len() as u32,
        }))
    }

    async fn register_users(
        &self,
        request: Request<relay::RegisterUsersRequest>,
    ) -> Result<Response<relay::RegisterUsersResponse>, Status> {
        let registrations = request.into_inner().registrations;
        Ok(Response::new(relay::RegisterUsersResponse {
            user_refs: registrations
                .iter()
                .map(|r| format!("ref-{}", r.user_id))
                .collect(),
        }))
    }

    async fn unregister_users(
        &self,
        request: Request<relay::UnregisterUsersRequest>,
    ) -> Result<Response<relay::UnregisterUsersResponse>, Status> {
        let removed = request.into_inner().unregistrations.len() as u32;
        Ok(Response::new(relay::UnregisterUsersResponse { removed }))
    }

    async fn put_profile(
        &self,
        _request: Request<relay::PutProfileRequest>,
    ) -> Result<Response<relay::PutProfileResponse>, Status> {
        Ok(Response::new(relay::PutProfileResponse {}))
    }

    async fn describe_enterprises(
        &self,
        request: Request<relay::DescribeEnterprisesRequest>,
    ) -> Result<Response<relay::DescribeEnterprisesResponse>, Status> {
        // Every enterprise is named after its id here.
        let enterprises = request
            .into_inner()
            .enterprise_ids
            .into_iter()
            .map(|id| relay::EnterpriseName {
                name: id.clone(),
                enterprise_id: id,
            })
            .collect();
        Ok(Response::new(relay::DescribeEnterprisesResponse {
            enterprises,
        }))
    }
}

/// The kit's terminal: confirms every push at once, reads when told, and
/// sends its response headers only with its first event (as grpcio does).
#[derive(Clone)]
pub(super) struct KitTerminal {
    pub(super) pushes: mpsc::UnboundedSender<terminal::PushedMessage>,
    pub(super) sink: Arc<Mutex<Option<mpsc::UnboundedSender<terminal::TerminalEvents>>>>,
}

impl KitTerminal {
    fn event(
        message: &terminal::PushedMessage,
        kind: terminal::EventKind,
    ) -> terminal::TerminalEvent {
        terminal::TerminalEvent {
            delivery_id: message.delivery_id.clone(),
            message_id: message.message_id.clone(),
            user_id: message.user_id.clone(),
            kind: kind as i32,
            at: Some(to_timestamp(Clock::system().now_ms())),
            region: "tokyo/shibuya".into(),
            trace_parent: String::new(),
        }
    }

    fn received(&self, messages: Vec<terminal::PushedMessage>) -> terminal::TerminalEvents {
        let events = messages
            .iter()
            .map(|m| Self::event(m, terminal::EventKind::Delivered))
            .collect();
        for message in messages {
            let _ = self.pushes.send(message);
        }
        terminal::TerminalEvents { events }
    }

    /// Sends a READ for `message` on the carrier's current stream.
    pub(super) fn read(&self, message: &terminal::PushedMessage) -> Result<(), String> {
        let sink = self.sink.lock().unwrap_or_else(|p| p.into_inner()).clone();
        sink.ok_or("no carrier stream is open to the kit's terminal")?
            .send(terminal::TerminalEvents {
                events: vec![Self::event(message, terminal::EventKind::Read)],
            })
            .map_err(|_| "the carrier's stream to the kit's terminal is closed".to_owned())
    }
}

#[tonic::async_trait]
impl terminal::terminal_server::Terminal for KitTerminal {
    type PushStream = Boxed<terminal::TerminalEvents>;

    async fn push(
        &self,
        request: Request<Streaming<terminal::PushRequest>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let mut inbound = request.into_inner();
        // No headers until there is something to answer.
        let first = loop {
            match inbound.message().await? {
                Some(request) if !request.messages.is_empty() => break request.messages,
                Some(_) => {}
                None => return Err(Status::cancelled("the carrier ended the stream")),
            }
        };
        let (sink, events) = mpsc::unbounded_channel();
        let _ = sink.send(self.received(first));
        *self.sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink.clone());
        let kit = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                if !request.messages.is_empty()
                    && sink.send(kit.received(request.messages)).is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            UnboundedReceiverStream::new(events),
            Ok,
        ))))
    }
}

/// One `Deliver` stream, as the relay holds it.
pub(super) struct Deliver {
    down: mpsc::Sender<pb::RelayToCarrier>,
    pub(super) up: mpsc::UnboundedReceiver<Result<pb::CarrierToRelay, Status>>,
}

impl Deliver {
    /// Opens a main stream presenting `token` and naming protocol `version`.
    pub(super) fn open(channel: &Channel, token: &str, version: &str) -> Deliver {
        Self::open_stream(channel, token, version, deliver::Stream::Main)
    }

    /// Opens a stream of kind `stream` presenting `token` and naming protocol `version`.
    pub(super) fn open_stream(
        channel: &Channel,
        token: &str,
        version: &str,
        stream: deliver::Stream,
    ) -> Deliver {
        let (down, outgoing) = mpsc::channel(16);
        let mut request = Request::new(ReceiverStream::new(outgoing));
        if let Ok(value) = version.parse() {
            request
                .metadata_mut()
                .insert(deliver::VERSION_HEADER, value);
        }
        deliver::put_stream(request.metadata_mut(), stream);
        let channel = channel.clone();
        let token = token.to_owned();
        let up = crate::forward(async move {
            let mut client = pb::carrier_client::CarrierClient::with_interceptor(
                channel,
                BearerInterceptor::new(&token)?,
            );
            client.deliver(request).await
        });
        Deliver { down, up }
    }

    pub(super) async fn send(&self, kind: pb::relay_to_carrier::Kind) -> Result<(), String> {
        self.down
            .send(pb::RelayToCarrier { kind: Some(kind) })
            .await
            .map_err(|_| "the Deliver stream is closed".to_owned())
    }

    /// The next message up that `pick` wants (others are skipped; receipt
    /// batches among them are not acked), within `timeout`.
    pub(super) async fn expect<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(&pb::carrier_to_relay::Kind) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.up.recv()).await {
                Ok(Some(Ok(message))) => {
                    if let Some(kind) = &message.kind
                        && let Some(found) = pick(kind)
                    {
                        return Ok(found);
                    }
                }
                Ok(Some(Err(status))) => {
                    return Err(format!("waiting for {what}: Deliver answered {status}"));
                }
                Ok(None) => return Err(format!("waiting for {what}: the Deliver stream ended")),
                Err(_) => return Err(format!("no {what} within {} s", timeout.as_secs())),
            }
        }
    }
}
