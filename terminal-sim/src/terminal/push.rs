//! The fleet's `Terminal` service: each carrier's push streams, taken in
//! a slice at a time, answered with delivered events on the stream they
//! came on.

use std::pin::Pin;

use chukei_proto::terminal::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Terminals;

/// Pushes a stream takes in at a time (see `push`).
const PUSH_SLICE: usize = 64;

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::TerminalEvents, Status>> + Send>>;

#[tonic::async_trait]
impl pb::terminal_server::Terminal for Terminals {
    type PushStream = EventStream;

    async fn push(
        &self,
        request: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<EventStream>, Status> {
        // A carrier's priority stream (targeted messages) answers its own
        // pushes; later events (reads) and the replay of earlier ones go on
        // the carrier's main stream.
        let priority = chukei_proto::push::is_priority(request.metadata());
        let mut inbound = request.into_inner();
        let (sink, events) = mpsc::unbounded_channel();
        let terminals = self.clone();
        self.inner.tasks.spawn(async move {
            let mut carrier_id = String::new();
            loop {
                let request = tokio::select! {
                    () = terminals.inner.cancel.cancelled() => break,
                    request = inbound.message() => request,
                };
                let Ok(Some(request)) = request else { break };
                if carrier_id.is_empty() && !request.carrier_id.is_empty() {
                    carrier_id = request.carrier_id.clone();
                    if !priority {
                        terminals.attach_sink(&carrier_id, sink.clone());
                    }
                }
                // A slice at a time, yielding between slices: a campaign's
                // request of 1,000 pushes taken in one poll held its worker
                // (and the state's lock) for tens of milliseconds, and the
                // runtime looks at its sockets only every few dozen polls —
                // a carrier's priority stream waited for hundreds of ms.
                // The request's events still go back together (the carrier
                // applies each message of events in one transaction).
                let mut messages = request.messages;
                let mut delivered = Vec::with_capacity(messages.len());
                while !messages.is_empty() {
                    let rest = messages.split_off(messages.len().min(PUSH_SLICE));
                    delivered.extend(terminals.receive(&carrier_id, messages));
                    messages = rest;
                    if !messages.is_empty() {
                        tokio::task::yield_now().await;
                    }
                }
                if !delivered.is_empty() && !terminals.send_events(&sink, delivered) {
                    break;
                }
            }
        });
        let stream = tokio_stream::StreamExt::map(UnboundedReceiverStream::new(events), Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}
