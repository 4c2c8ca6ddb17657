//! Many personalised messages on one stream: `SendMessages` accepts or
//! refuses each request on its own, and `enterprise-cli send --from-file`
//! turns a file into one such stream with a result per line.

use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use clap::Parser;
use integration_tests::{Backend, Hub, backend_tests, send_request};
use terminal_sim::fleet::Fleet;
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::OpenMode;
use tonic::Code;

/// Each request of a stream has its own outcome: the accepted ones are
/// durable messages (the same message id when a key comes again), a refused
/// one names its field and does not end the stream; the file form does the
/// same per line and can be sent again without sending anything twice.
async fn each_request_of_a_stream_has_its_own_outcome(backend: Backend) {
    let Some(mut hub) = Hub::start(backend, &["alpha"]).await.unwrap() else {
        return;
    };
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let fleet = Fleet::generate(31, 6, &["alpha".into()])
        .with_every_channel()
        .everyone_registers();
    let terminals = hub
        .start_fleet(
            fleet.clone(),
            vec![EnterpriseChoice::enterprise(&shop)],
            OpenMode::Never,
        )
        .await
        .unwrap();
    let refs: Vec<String> = integration_tests::refs_by_user(&hub, &fleet, &shop)
        .await
        .into_values()
        .collect();
    assert!(refs.len() >= 4, "{refs:?}");

    let one = |key: &str, user_ref: &str, text: &str| {
        send_request(
            key,
            pb::target::Kind::Refs(pb::RefList {
                refs: vec![user_ref.to_owned()],
            }),
            text,
            common::Channel::Sms,
        )
    };
    let requests = vec![
        one("k0", &refs[0], "Hello, first"),
        one("k1", "r000000000000000000000000", "nobody"),
        one("k2", &refs[1], ""),
        one("k3", &refs[1], "Hello, second"),
        one("k0", &refs[0], "Hello, first"),
    ];
    let mut client = hub.enterprise(&key).await.unwrap();
    let mut results: Vec<pb::SendMessagesResult> = Vec::new();
    let mut stream = client
        .send_messages(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    while let Some(result) = stream.message().await.unwrap() {
        results.push(result);
    }
    results.sort_by_key(|r| r.index);
    let indexes: Vec<u64> = results.iter().map(|r| r.index).collect();
    assert_eq!(indexes, [0, 1, 2, 3, 4], "one result per request");
    let accepted = |r: &pb::SendMessagesResult| match &r.outcome {
        Some(pb::send_messages_result::Outcome::Accepted(a)) => Some(a.clone()),
        _ => None,
    };
    let refused = |r: &pb::SendMessagesResult| match &r.outcome {
        Some(pb::send_messages_result::Outcome::Refused(refusal)) => {
            Some((Code::from(refusal.code), refusal.message.clone()))
        }
        _ => None,
    };
    let first = accepted(&results[0]).expect("k0 accepted");
    assert_eq!(first.matched, Some(1));
    let (code, message) = refused(&results[1]).expect("an unknown ref is refused");
    assert_eq!(code, Code::NotFound, "{message}");
    assert!(message.starts_with("target.refs"), "{message}");
    let (code, message) = refused(&results[2]).expect("an empty text is refused");
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(message.contains("content.text"), "{message}");
    assert!(accepted(&results[3]).is_some());
    assert_eq!(
        accepted(&results[4]).unwrap().message_id,
        first.message_id,
        "the same key and body give the same message"
    );
    assert_eq!(results[4].idempotency_key, "k0");
    hub.wait_for_message(&key, &first.message_id, |s| s.delivered == 1)
        .await;

    // The same from a file, with a bad line; then the file once more.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("greetings.csv");
    let mut csv = String::from("ref,text\n");
    for (i, user_ref) in refs.iter().enumerate() {
        csv.push_str(&format!("{user_ref},\"Hello, person {i}\"\n"));
    }
    csv.push_str("r000000000000000000000000,nobody\n");
    csv.push_str("only-a-ref\n");
    std::fs::write(&file, csv).unwrap();
    let run = |file: &std::path::Path| {
        let cli = enterprise_cli::Cli::try_parse_from([
            "enterprise-cli",
            "--relay-url",
            &hub.relay_url(),
            "--api-key",
            &key,
            "send",
            "--channel",
            "sms",
            "--from-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        async move {
            let mut out = Vec::new();
            enterprise_cli::run(cli, &mut out).await.unwrap();
            String::from_utf8(out).unwrap()
        }
    };
    let read_results = || -> Vec<serde_json::Value> {
        let mut lines: Vec<serde_json::Value> =
            std::fs::read_to_string(dir.path().join("greetings.csv.results.jsonl"))
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect();
        lines.sort_by_key(|line| line["line"].as_u64());
        lines
    };
    let summary = run(&file).await;
    let n = refs.len();
    assert!(
        summary.starts_with(&format!("{} lines: {n} accepted, 2 refused", n + 2)),
        "{summary}"
    );
    let first_run = read_results();
    assert_eq!(first_run.len(), n + 2);
    assert_eq!(first_run[n]["refused"]["code"], "NotFound");
    assert_eq!(first_run[n + 1]["refused"]["code"], "InvalidArgument");
    let ids: Vec<&str> = first_run[..n]
        .iter()
        .map(|line| line["message_id"].as_str().unwrap())
        .collect();
    for id in &ids {
        hub.wait_for_message(&key, id, |s| s.delivered == 1).await;
    }
    let received = terminals.snapshot().received;
    run(&file).await;
    let second_run = read_results();
    let again: Vec<&str> = second_run[..n]
        .iter()
        .map(|line| line["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(again, ids, "sending the file again sends nothing twice");
    assert_eq!(terminals.snapshot().received, received);
    hub.shutdown().await.unwrap();
}

backend_tests!(each_request_of_a_stream_has_its_own_outcome);
