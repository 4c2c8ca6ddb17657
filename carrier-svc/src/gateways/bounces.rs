//! Bounces of e-mail the mail server had accepted: each mail goes with a
//! signed envelope sender (VERP) `b<delivery>.<tag>@<--bounce-domain>`, so a
//! bounce needs no parsing to be matched — the mail server (or the Internet)
//! sends it to that address, the operator routes the bounce domain to
//! `--bounce-listen`, and this small SMTP receiver turns each bounce into a
//! failure of its delivery. An address whose signature does not verify is
//! refused at RCPT, so a forged bounce fails nothing. The DSN's `Status:`
//! (e.g. 5.1.1), when present, is kept as the reason; the rest of the
//! message, which may quote the address, is not kept. A bounce for a mail
//! whose acceptance the carrier has not recorded yet is answered 451 at
//! RCPT: the sender tries again later.
//!
//! The SMTP spoken is the little a bounce needs (RFC 5321: EHLO/HELO, MAIL,
//! RCPT, DATA, RSET, NOOP, QUIT); the bounce is stored before its `250`, so
//! a receiver that stops first loses nothing (the sender tries again).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::tracking::Signer;
use super::{Outcome, Report};
use crate::storage::Store;

/// A bounce message larger than this is refused.
const MAX_MESSAGE: usize = 1 << 20;

/// Serves the bounce receiver on `listener` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    signer: Signer,
    store: Store,
    reports: mpsc::Sender<Report>,
    cancel: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "bounce listener failed to accept");
                    continue;
                }
            },
        };
        let (signer, store, reports, cancel) = (
            signer.clone(),
            store.clone(),
            reports.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            let session = session(stream, &signer, &store, &reports);
            tokio::select! {
                () = cancel.cancelled() => {}
                outcome = tokio::time::timeout(Duration::from_secs(300), session) => {
                    if let Ok(Err(error)) = outcome {
                        tracing::debug!(%error, "bounce session ended");
                    }
                }
            }
        });
    }
}

async fn session(
    stream: TcpStream,
    signer: &Signer,
    store: &Store,
    reports: &mpsc::Sender<Report>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    write
        .write_all(b"220 chukei-carrier bounces ESMTP\r\n")
        .await?;
    // The mails (their ids at the gateway) the accepted recipients name.
    let mut bounced: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_ascii_uppercase();
        let reply: &[u8] = if command.starts_with("EHLO") || command.starts_with("HELO") {
            b"250 chukei-carrier\r\n"
        } else if command.starts_with("MAIL FROM:") {
            bounced.clear();
            b"250 2.1.0 ok\r\n"
        } else if command.starts_with("RCPT TO:") {
            let address = line.trim_end()[8..].trim();
            let address = address
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or("");
            let local = address.split('@').next().unwrap_or("");
            match signer.verify_bounce(local) {
                // A mail whose acceptance is not recorded yet (its bounce
                // came first): the sender tries again later, as SMTP does.
                Some(delivery_id) => match store.gateway_id_of("smtp", delivery_id).await? {
                    Some(external_id) => {
                        bounced.push(external_id);
                        b"250 2.1.5 ok\r\n"
                    }
                    None => b"451 4.3.0 not known yet, try again later\r\n",
                },
                None => b"550 5.1.1 no such bounce address\r\n",
            }
        } else if command == "DATA" {
            if bounced.is_empty() {
                b"554 5.5.1 no valid recipients\r\n"
            } else {
                write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let message = read_message(&mut read).await?;
                let status = dsn_status(&message);
                report(reports, &bounced, status).await?;
                bounced.clear();
                b"250 2.0.0 bounce recorded\r\n"
            }
        } else if command == "RSET" {
            bounced.clear();
            b"250 2.0.0 ok\r\n"
        } else if command == "NOOP" {
            b"250 2.0.0 ok\r\n"
        } else if command == "QUIT" {
            write.write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            b"502 5.5.2 not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
}

/// The message body up to the lone dot, dot-unstuffed.
async fn read_message<R: AsyncBufReadExt + AsyncReadExt + Unpin>(
    read: &mut R,
) -> anyhow::Result<String> {
    let mut message = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            anyhow::bail!("the connection ended inside DATA");
        }
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed == "." {
            return Ok(message);
        }
        if message.len() < MAX_MESSAGE {
            message.push_str(trimmed.strip_prefix('.').unwrap_or(trimmed));
            message.push('\n');
        }
    }
}

/// The first `Status:` of a delivery status notification (RFC 3464), e.g.
/// `5.1.1`; only the code, never the text around it.
fn dsn_status(message: &str) -> Option<String> {
    message.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("status") {
            return None;
        }
        let code = value.split_whitespace().next()?;
        code.chars()
            .all(|c| c.is_ascii_digit() || c == '.')
            .then(|| code.to_owned())
    })
}

/// A failure report for each bounced mail, stored before returning.
async fn report(
    reports: &mpsc::Sender<Report>,
    mails: &[String],
    status: Option<String>,
) -> anyhow::Result<()> {
    let error = match status {
        Some(status) => format!("bounced {status}"),
        None => "bounced".to_owned(),
    };
    let mut stored = Vec::new();
    for external_id in mails {
        let (done, is_done) = oneshot::channel();
        reports
            .send(Report::new(
                external_id.clone(),
                Outcome::Bounced,
                error.clone(),
                Some(done),
            ))
            .await
            .map_err(|_| anyhow::anyhow!("shutting down"))?;
        stored.push(is_done);
    }
    for is_stored in stored {
        is_stored.await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dsn_status_is_read_and_nothing_else() {
        let dsn = "Reporting-MTA: dns; mx.example\n\nFinal-Recipient: rfc822; someone@example.jp\nAction: failed\nStatus: 5.1.1 (user unknown)\n";
        assert_eq!(dsn_status(dsn).as_deref(), Some("5.1.1"));
        assert_eq!(dsn_status("Subject: hi\n\nno status here\n"), None);
    }
}
