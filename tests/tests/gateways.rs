//! Real channels at the carrier, on both backends, against servers that are
//! not ours (`tests/python/`):
//!
//! - SMS over SMPP to a scripted SMSC that answers `submit_sm` with hex ids
//!   and reports receipts naming them in decimal, refuses one number, reports
//!   another undeliverable and throttles every seventh submit. A long GSM text
//!   and a Japanese one go to everyone registered; the carrier is killed
//!   midway and started again. Every delivery is counted exactly once at the
//!   relay (delivered, or failed for the two numbers), and every text arrives
//!   whole at the SMSC, its parts put back together by their concatenation
//!   header.
//! - E-mail over SMTP to an `aiosmtpd` server that refuses one mailbox and
//!   accepts another only to bounce it later (a DSN to the mail's signed
//!   envelope sender, through the carrier's bounce receiver): one mail per
//!   person with the From, To, Subject, Message-ID and body checked; the
//!   refused and the bounced mailbox are FAILED receipts, a forged bounce
//!   address is refused; each mail's open pixel fetched is a read counted at
//!   the relay, a forged one is refused.
//!
//! Needs `CHUKEI_TEST_PYTHON` (a Python with `aiosmtpd`, as `.ci/run`
//! installs); without it the tests say so and do nothing.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use carrier_svc::gateways::GatewayArgs;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use integration_tests::http::call;
use integration_tests::peers::{helper, lines, listening, python, texts_by_number};
use integration_tests::process::{Process, free_port};
use integration_tests::{
    Backend, Hub, Settings, backend_tests, eventually, registered_users, send_request,
};
use terminal_sim::fleet::{Fleet, SimUser};
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::OpenMode;

const SEED: u64 = 31;

/// A helper server on `port`.
fn server(python: &Path, script: &str, port: u16, args: &[String]) -> Process {
    let mut all = vec!["--port".to_owned(), port.to_string()];
    all.extend_from_slice(args);
    helper(python, script, &all)
}

/// A hub with one carrier (gateways as `settings` say) and a fleet of
/// `users` with every channel, never opening; the people registered with
/// its enterprise, by user id, and the enterprise's key.
async fn hub_with(
    backend: Backend,
    settings: Settings,
    users: usize,
) -> Option<(Hub, String, Vec<SimUser>)> {
    let mut hub = Hub::start_settings(backend, &["alpha"], settings)
        .await
        .unwrap()?;
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let fleet = Fleet::generate(SEED, users, &["alpha".into()]).with_every_channel();
    hub.start_fleet(
        fleet.clone(),
        vec![EnterpriseChoice::enterprise(&shop)],
        OpenMode::Never,
    )
    .await
    .unwrap();
    let mut registered: Vec<SimUser> = registered_users(&fleet, &shop).into_values().collect();
    registered.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    Some((hub, key, registered))
}

fn number_of(user: &SimUser) -> String {
    user.phone_number.trim_start_matches('+').to_owned()
}

async fn sms_through_an_smsc_counted_once_across_a_carrier_kill(backend: Backend) {
    let Some(python) = python("the gateway tests against Python servers") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let smsc_port = free_port().unwrap();
    let settings = Settings {
        carrier_gateways: GatewayArgs {
            smpp_url: Some(format!("smpp://127.0.0.1:{smsc_port}")),
            smpp_system_id: "chukei".into(),
            smpp_password: "secret".into(),
            smpp_source_addr: "ShopNews".into(),
            smpp_window: 8,
            smpp_max_per_sec: 400,
            ..GatewayArgs::default()
        },
        ..Settings::default()
    };
    let Some((mut hub, key, registered)) = hub_with(backend, settings, 150).await else {
        return;
    };
    let (refused, undeliverable) = (&registered[0], &registered[1]);
    let record = dir.path().join("smsc.jsonl");
    let _smsc = server(
        &python,
        "smsc.py",
        smsc_port,
        &[
            "--ids".into(),
            "hex".into(),
            "--cross-base".into(),
            "--refuse".into(),
            number_of(refused),
            "--undeliverable".into(),
            number_of(undeliverable),
            "--throttle-every".into(),
            "7".into(),
            "--record".into(),
            record.display().to_string(),
        ],
    );
    listening(smsc_port, Duration::from_secs(30)).await;

    let long = "Autumn sale: everything [20%] off, €5 vouchers for members. ".repeat(6);
    let japanese = "秋のセール開催中です。会員の皆様には特別クーポンをお届けします。".repeat(3);
    let mut client = hub.enterprise(&key).await.unwrap();
    let mut ids = Vec::new();
    for (idempotency_key, text) in [("long", &long), ("japanese", &japanese)] {
        let sent = client
            .send_message(send_request(
                idempotency_key,
                pb::target::Kind::AllRegistered(true),
                text,
                common::Channel::Sms,
            ))
            .await
            .unwrap()
            .into_inner();
        ids.push(sent.message_id);
    }

    // Midway: a third of the parts at the SMSC, then the carrier dies.
    let parts_expected = registered.len() * (3 + 3);
    eventually(
        "a third of the parts at the SMSC",
        Duration::from_secs(60),
        || {
            let record = record.clone();
            async move { (lines(&record).len() >= parts_expected / 3).then_some(()) }
        },
    )
    .await;
    hub.kill_carrier("alpha").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    hub.restart_carrier("alpha").await.unwrap();

    for message_id in &ids {
        let status = hub
            .wait_for_message(&key, message_id, |s| {
                s.matched > 0 && s.delivered + s.failed == s.matched
            })
            .await;
        assert_eq!(status.matched as usize, registered.len());
        assert_eq!(status.handed_over, status.matched);
        assert_eq!(status.failed, 2, "the refused and the undeliverable number");
        assert_eq!(status.delivered, status.matched - 2);
    }
    // Nothing more arrives later: counted once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for message_id in &ids {
        let status = hub.wait_for_message(&key, message_id, |_| true).await;
        assert_eq!((status.delivered, status.failed), (status.matched - 2, 2));
    }

    let texts = texts_by_number(&record);
    for user in &registered {
        let got = texts.get(&number_of(user)).cloned().unwrap_or_default();
        if user.user_id == refused.user_id {
            assert!(got.is_empty(), "the refused number took nothing");
            continue;
        }
        for text in [&long, &japanese] {
            assert!(
                got.contains(text),
                "{} did not get the text whole: {got:?}",
                user.user_id
            );
        }
    }
    let codings: Vec<u64> = lines(&record)
        .iter()
        .map(|l| l["data_coding"].as_u64().unwrap())
        .collect();
    assert!(
        codings.contains(&0) && codings.contains(&8),
        "GSM 7-bit and UCS-2 both used"
    );
}

async fn email_through_a_mail_server_with_signed_open_pixels(backend: Backend) {
    let Some(python) = python("the gateway tests against Python servers") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port().unwrap();
    let tracking_port = free_port().unwrap();
    let bounce_port = free_port().unwrap();
    // The mail server holds its port before the hub's processes pick
    // theirs (one of them took it once, between `free_port` and the bind);
    // whom it refuses or bounces is written once the fleet is known.
    let record = dir.path().join("mail.jsonl");
    let rules = dir.path().join("rules.json");
    let _smtp = server(
        &python,
        "smtp_sink.py",
        smtp_port,
        &[
            "--record".into(),
            record.display().to_string(),
            "--rules".into(),
            rules.display().to_string(),
            "--bounce-relay".into(),
            format!("127.0.0.1:{bounce_port}"),
        ],
    );
    listening(smtp_port, Duration::from_secs(30)).await;
    let settings = Settings {
        carrier_gateways: GatewayArgs {
            smtp_url: Some(format!("smtp://127.0.0.1:{smtp_port}")),
            mail_from: "Shop News <news@mail.chukei.test>".into(),
            tracking_listen: Some(([127, 0, 0, 1], tracking_port).into()),
            tracking_url: format!("http://127.0.0.1:{tracking_port}"),
            tracking_secret: "a tracking secret of at least 32 chars".into(),
            bounce_listen: Some(([127, 0, 0, 1], bounce_port).into()),
            bounce_domain: "bounces.chukei.test".into(),
            ..GatewayArgs::default()
        },
        ..Settings::default()
    };
    let Some((hub, key, registered)) = hub_with(backend, settings, 60).await else {
        return;
    };
    let (refused, bounced) = (&registered[0], &registered[1]);
    std::fs::write(
        &rules,
        serde_json::json!({"refuse": [refused.email], "bounce": [bounced.email]}).to_string(),
    )
    .unwrap();

    let mut request = send_request(
        "mail",
        pb::target::Kind::AllRegistered(true),
        "Our autumn collection is here.\nSee you soon!",
        common::Channel::Email,
    );
    let content = request.content.as_mut().unwrap();
    content.subject = "Autumn collection".into();
    content.media_url = "https://shop.example/autumn.png".into();
    let mut client = hub.enterprise(&key).await.unwrap();
    let message_id = client
        .send_message(request)
        .await
        .unwrap()
        .into_inner()
        .message_id;
    // The bounced mail was delivered (accepted) first, then failed.
    let status = hub
        .wait_for_message(&key, &message_id, |s| {
            s.matched > 0 && s.delivered + s.failed == s.matched + 1
        })
        .await;
    assert_eq!(status.matched as usize, registered.len());
    assert_eq!(status.failed, 2, "the refused and the bounced mailbox");
    assert_eq!(status.delivered, status.matched - 1);
    assert_eq!(status.opened, 0);
    // Mail for every other mailbox went with a signed envelope sender.
    let mails = lines(&record);
    let sender = mails[0]["mail_from"].as_str().unwrap();
    assert!(sender.starts_with('b') && sender.ends_with("@bounces.chukei.test"));
    // A bounce to an address nobody signed fails nothing.
    let refusal = smtp_rcpt(bounce_port, "b1.00000000000000000000@bounces.chukei.test").await;
    assert!(refusal.starts_with("550"), "{refusal}");

    let mails = lines(&record);
    assert_eq!(
        mails.len(),
        registered.len() - 1,
        "one mail per person taken"
    );
    let by_address: HashMap<&str, &SimUser> =
        registered.iter().map(|u| (u.email.as_str(), u)).collect();
    let mut pixels = Vec::new();
    for mail in &mails {
        let to = mail["rcpt_tos"][0].as_str().unwrap();
        assert!(
            by_address.contains_key(to),
            "a mail to an address nobody gave"
        );
        assert_eq!(mail["to"], to);
        assert_eq!(mail["from"], "Shop News <news@mail.chukei.test>");
        assert_eq!(mail["subject"], "Autumn collection");
        let id = mail["message_id"].as_str().unwrap();
        assert!(
            id.starts_with("<d") && id.ends_with(&format!(".{message_id}@mail.chukei.test>")),
            "Message-ID {id}"
        );
        let plain = mail["parts"]["text/plain"]
            .as_str()
            .unwrap()
            .replace("\r\n", "\n");
        assert!(plain.starts_with("Our autumn collection is here.\nSee you soon!"));
        let html = mail["parts"]["text/html"].as_str().unwrap();
        assert!(html.contains("Our autumn collection is here.<br>See you soon!"));
        let pixel = html
            .split("<img src=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        let click = html
            .split("<a href=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .replace("&amp;", "&");
        pixels.push((pixel.to_owned(), click));
    }

    let tracking = format!("http://127.0.0.1:{tracking_port}");
    let path = |url: &str| url.strip_prefix(&tracking).unwrap().to_owned();
    // A guessed link: one character of a real one's signature changed.
    let (first, _) = &pixels[0];
    let mut forged = path(first).into_bytes();
    let tag_at = forged[..forged.len() - 4]
        .iter()
        .rposition(|&b| b == b'.')
        .unwrap()
        + 1;
    forged[tag_at] = if forged[tag_at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let reply = call(&tracking, "GET", &forged, &[], None).await;
    assert_eq!(reply.status, 404);
    for (pixel, _) in &pixels {
        let reply = call(&tracking, "GET", &path(pixel), &[], None).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some("image/gif"));
    }
    let (_, click) = &pixels[1];
    let reply = call(&tracking, "GET", &path(click), &[], None).await;
    assert_eq!(reply.status, 302);
    assert_eq!(
        reply.header("location"),
        Some("https://shop.example/autumn.png")
    );

    // Every mail's pixel was fetched, the bounced one's too: a mail that
    // came back was never read, so that one counts nothing.
    let readers = registered.len() - 2;
    let status = hub
        .wait_for_message(&key, &message_id, |s| s.opened as usize == readers)
        .await;
    assert_eq!(status.opened, status.delivered - 1);
    // A second fetch of a pixel is the same read.
    let (pixel, _) = &pixels[2];
    call(&tracking, "GET", &path(pixel), &[], None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = hub.wait_for_message(&key, &message_id, |_| true).await;
    assert_eq!(status.opened as usize, readers);
    hub.shutdown().await.unwrap();
}

/// What an SMTP server on `port` answers to `RCPT TO:<address>`.
async fn smtp_rcpt(port: u16, address: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    let answer = async |read: &mut BufReader<_>, line: &mut String| {
        line.clear();
        read.read_line(line).await.unwrap();
        line.clone()
    };
    answer(&mut read, &mut line).await;
    for command in ["EHLO test\r\n", "MAIL FROM:<>\r\n"] {
        write.write_all(command.as_bytes()).await.unwrap();
        answer(&mut read, &mut line).await;
    }
    write
        .write_all(format!("RCPT TO:<{address}>\r\n").as_bytes())
        .await
        .unwrap();
    answer(&mut read, &mut line).await
}

backend_tests!(
    sms_through_an_smsc_counted_once_across_a_carrier_kill,
    email_through_a_mail_server_with_signed_open_pixels,
);
