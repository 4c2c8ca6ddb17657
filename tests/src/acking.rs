//! A carrier that acknowledges everything and stores nothing.

/// A carrier that stores nothing and acknowledges every batch and every
/// batch of erasure notices: the far end of `bench transport`, and of tests
/// about the relay's side of the `Deliver` stream. With `headers_late` it is
/// written like grpcio's servers: its response headers (with its protocol
/// version) go only with its first acknowledgement, which it has only once
/// something came down. With `stall_main` it never reads its main stream
/// (a carrier stuck on a campaign), and serves only the priority stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct AckingCarrier {
    pub headers_late: bool,
    pub stall_main: bool,
}

/// What [`AckingCarrier`] answers to one message down the stream.
fn acknowledgement(
    request: chukei_proto::carrier::v1::RelayToCarrier,
) -> Option<chukei_proto::carrier::v1::CarrierToRelay> {
    use chukei_proto::carrier::v1 as cpb;
    let kind = match request.kind? {
        cpb::relay_to_carrier::Kind::Batch(batch) => {
            cpb::carrier_to_relay::Kind::BatchAck(cpb::BatchAck {
                batch_id: batch.batch_id,
            })
        }
        cpb::relay_to_carrier::Kind::Erasures(erasures) => {
            cpb::carrier_to_relay::Kind::ErasureAck(cpb::ErasureAck {
                notice_ids: erasures.erasures.iter().map(|e| e.notice_id).collect(),
            })
        }
        cpb::relay_to_carrier::Kind::ReceiptAck(_) => return None,
    };
    Some(cpb::CarrierToRelay { kind: Some(kind) })
}

#[tonic::async_trait]
impl chukei_proto::carrier::v1::carrier_server::Carrier for AckingCarrier {
    type DeliverStream = tokio_stream::wrappers::ReceiverStream<
        Result<chukei_proto::carrier::v1::CarrierToRelay, tonic::Status>,
    >;

    async fn deliver(
        &self,
        request: tonic::Request<tonic::Streaming<chukei_proto::carrier::v1::RelayToCarrier>>,
    ) -> Result<tonic::Response<Self::DeliverStream>, tonic::Status> {
        let stream = chukei_proto::deliver::stream_in(request.metadata())
            .map_err(tonic::Status::invalid_argument)?;
        let mut inbound = request.into_inner();
        let (acks, acks_rx) = tokio::sync::mpsc::channel(64);
        if self.stall_main && stream == chukei_proto::deliver::Stream::Main {
            // Open, answered, and never read: what comes down stays down.
            tokio::spawn(async move {
                let _held = (inbound, acks);
                std::future::pending::<()>().await;
            });
            let mut response =
                tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(acks_rx));
            chukei_proto::deliver::put_version(response.metadata_mut());
            return Ok(response);
        }
        if self.headers_late {
            // No answer — so no headers — until there is something to acknowledge.
            let first = loop {
                match inbound.message().await? {
                    Some(request) => {
                        if let Some(ack) = acknowledgement(request) {
                            break ack;
                        }
                    }
                    None => return Err(tonic::Status::cancelled("the relay left")),
                }
            };
            acks.send(Ok(first)).await.ok();
        }
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                if let Some(ack) = acknowledgement(request) {
                    if acks.send(Ok(ack)).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut response =
            tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(acks_rx));
        chukei_proto::deliver::put_version(response.metadata_mut());
        Ok(response)
    }
}
