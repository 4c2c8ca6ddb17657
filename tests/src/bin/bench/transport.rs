//! `transport`: the bare `Deliver` stream's ceiling.

use super::*;

/// Runs the transport ceiling and returns its rate (deliveries a second).
pub(super) async fn transport(
    deliveries: usize,
    batch_size: usize,
    window: usize,
) -> anyhow::Result<f64> {
    use chukei_proto::carrier::v1 as cpb;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                cpb::carrier_server::CarrierServer::new(integration_tests::AckingCarrier::default())
                    .max_decoding_message_size(64 * 1024 * 1024),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = cpb::carrier_client::CarrierClient::new(channel)
        .max_encoding_message_size(64 * 1024 * 1024);
    let (down, down_rx) = tokio::sync::mpsc::channel::<cpb::RelayToCarrier>(window + 4);
    let mut up = client
        .deliver(tokio_stream::wrappers::ReceiverStream::new(down_rx))
        .await?
        .into_inner();
    // Deliveries as the relay's dispatcher builds them: one campaign's
    // recipients packed behind its content (Deliver protocol version 2).
    let batch = |batch_id: u64| cpb::DeliveryBatch {
        batch_id,
        messages: vec![cpb::MessageDeliveries {
            message_id: "msg_0192f0a0b1c2d3e4f5a6b7c8d9e0f1a2".into(),
            content: Some(common::Content {
                text: "benchmark".into(),
                ..Default::default()
            }),
            channel: common::Channel::Sms as i32,
            expires_at: Some(chukei_proto::clock::to_timestamp(1_900_000_000_000)),
            single_attempt: true,
            delivery_ids: (0..batch_size)
                .map(|i| (batch_id as usize * batch_size + i) as u64)
                .collect(),
            user_ids: (0..batch_size).map(|i| format!("user-{i:07}")).collect(),
            ..Default::default()
        }],
    };
    let batches = deliveries.div_ceil(batch_size) as u64;
    let started = Instant::now();
    let mut sent = 0;
    let mut acked = 0;
    while acked < batches {
        while sent < batches && sent - acked < window as u64 {
            sent += 1;
            down.send(cpb::RelayToCarrier {
                kind: Some(cpb::relay_to_carrier::Kind::Batch(batch(sent))),
            })
            .await?;
        }
        match up.message().await? {
            Some(_) => acked += 1,
            None => anyhow::bail!("the stream ended"),
        }
    }
    let elapsed = started.elapsed();
    let rate = (batches as usize * batch_size) as f64 / elapsed.as_secs_f64();
    println!(
        "transport ceiling: {} deliveries in batches of {batch_size}, {window} in flight, over a bare Deliver stream: {:.2}s, {rate:.0} deliveries/s",
        batches as usize * batch_size,
        elapsed.as_secs_f64(),
    );
    Ok(rate)
}
