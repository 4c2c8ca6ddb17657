//! The terminal-sim binary's interactive mode, as a person would use it:
//! register with consent, see the message arrive in the inbox, open it, and
//! the open reaches the enterprise's counts; then change consent (shown the
//! exact values first), withdraw it and leave the enterprise.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use integration_tests::process::{free_port, test_binary};
use integration_tests::{Backend, Hub, wait_healthy};
use terminal_sim::fleet::Fleet;
use terminal_sim::terminal::OpenMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_reads_a_message_in_interactive_mode() {
    let mut hub = Hub::start(Backend::Sqlite, &["alpha"])
        .await
        .unwrap()
        .unwrap();
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    // Provision the subscriber through a fleet of one, then hand the user to the interactive terminal.
    let fleet = Fleet::generate(9, 1, &["alpha".into()]).with_every_channel();
    let user_id = fleet.users[0].user_id.clone();
    hub.start_fleet(fleet, vec![], OpenMode::Never)
        .await
        .unwrap();
    hub.stop_fleet().await.unwrap();

    let binary = test_binary("terminal-sim").unwrap();
    let port = free_port().unwrap();
    let mut child = Command::new(binary)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "interactive",
            "--user-id",
            &user_id,
        ])
        .arg(format!("--carrier=alpha={}", hub.carriers[0].url()))
        .args(["--register", &shop, "--share", "gender,age-decade"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let wait_line = |what: &str| -> String {
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no line containing {what:?}"));
            if line.contains(what) {
                return line;
            }
        }
    };
    let registered = wait_line("the enterprise knows you as");
    let user_ref = registered.rsplit(' ').next().unwrap().to_owned();
    wait_line("attached as");
    wait_healthy(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();

    let mut client = hub.enterprise(&key).await.unwrap();
    let sent = client
        .send_message(integration_tests::send_request(
            "interactive",
            pb::target::Kind::Refs(pb::RefList {
                refs: vec![user_ref],
            }),
            "See you at the shop",
            common::Channel::Rcs,
        ))
        .await
        .unwrap()
        .into_inner();
    hub.wait_for_message(&key, &sent.message_id, |s| s.delivered == 1)
        .await;

    writeln!(stdin, "inbox").unwrap();
    let listed = wait_line("See you at the shop");
    assert!(
        listed.contains("new") && listed.contains(&sent.message_id),
        "{listed}"
    );
    writeln!(stdin, "open 0").unwrap();
    wait_line("opened");
    let status = hub
        .wait_for_message(&key, &sent.message_id, |s| s.opened == 1)
        .await;
    assert_eq!((status.matched, status.delivered, status.opened), (1, 1, 1));

    // From the terminal: share the region too (shown first), then withdraw,
    // then leave the enterprise.
    writeln!(stdin, "consent {shop} gender,region-prefecture").unwrap();
    let shown = wait_line("will be able to choose you for messages by:");
    assert!(
        shown.contains("region: ") && shown.contains("gender: "),
        "{shown}"
    );
    wait_line("consent changed");
    writeln!(stdin, "consent {shop}").unwrap();
    let shown = wait_line("will be able to choose you for messages by:");
    assert!(shown.contains("nothing about you"), "{shown}");
    wait_line("consent withdrawn");
    writeln!(stdin, "consent {shop} astrology").unwrap();
    wait_line("unknown field");
    writeln!(stdin, "leave {shop}").unwrap();
    wait_line("1 registration(s) erased");
    let listed = client
        .list_registrations(pb::ListRegistrationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.registrations.is_empty());
    let audit = hub
        .admin()
        .await
        .unwrap()
        .list_audit_log(pb::ListAuditLogRequest { limit: 50 })
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<&str> = audit.entries.iter().map(|e| e.action.as_str()).collect();
    for action in [
        "consent.recorded",
        "consent.changed",
        "consent.withdrawn",
        "erasure",
    ] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    let exited = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exited.success());
    hub.shutdown().await.unwrap();
}
