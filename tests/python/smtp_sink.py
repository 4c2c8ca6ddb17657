"""A mail server for the carrier's e-mail gateway tests, built on aiosmtpd.

Every message it takes is appended to --record as a JSON line: the envelope
(sender, recipients), the headers that matter (From, To, Subject,
Message-ID, Content-Type) and each text part, decoded. A recipient whose
address starts with one of --refuse is refused at RCPT with 550 5.1.1, as a
mail server refuses a mailbox it does not have. A recipient starting with
one of --bounce is accepted, then bounced: a delivery status notification
(RFC 3464, Status 5.1.1) is sent to the message's envelope sender through
the SMTP server at --bounce-relay, as a mail server bounces what it could
not deliver after all. Prints "listening PORT" once ready.
"""

import argparse
import asyncio
import email
import email.policy
import json
import smtplib
import socket
import sys
import threading
import time

from aiosmtpd.controller import Controller


DSN = """From: MAILER-DAEMON@sink.test
To: {sender}
Subject: Undelivered Mail Returned to Sender
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: text/plain

The mail to {recipient} could not be delivered.
--b
Content-Type: message/delivery-status

Reporting-MTA: dns; sink.test

Final-Recipient: rfc822; {recipient}
Action: failed
Status: 5.1.1
--b--
"""


def bounce(relay, sender, recipient):
    """Sends the DSN, trying again after a 4xx as a mail server does."""
    host, port = relay.rsplit(":", 1)
    for _ in range(60):
        try:
            with smtplib.SMTP(host, int(port), timeout=30) as client:
                client.sendmail("", [sender], DSN.format(sender=sender, recipient=recipient))
            return
        except smtplib.SMTPRecipientsRefused as refused:
            code = list(refused.recipients.values())[0][0]
            if code < 400 or code >= 500:
                return
        except (OSError, smtplib.SMTPException):
            pass
        time.sleep(0.5)


class Recorder:
    def __init__(self, record, refuse, bounce, bounce_relay, rules=None):
        self.record = open(record, "a", encoding="utf-8")
        self.refuse = [prefix for prefix in refuse if prefix]
        self.bounce = [prefix for prefix in bounce if prefix]
        self.bounce_relay = bounce_relay
        self.rules = rules

    def prefixes(self):
        """The refuse and bounce prefixes: the flags', plus those in the rules
        file once it exists (a test that learns the addresses only after its
        hub is up writes them there; the server is up and its port held
        before the hub picks its own ports)."""
        refuse, bounce = list(self.refuse), list(self.bounce)
        if self.rules:
            try:
                with open(self.rules, encoding="utf-8") as f:
                    rules = json.load(f)
                refuse += [p for p in rules.get("refuse", []) if p]
                bounce += [p for p in rules.get("bounce", []) if p]
            except FileNotFoundError:
                pass
        return refuse, bounce

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        refuse, _ = self.prefixes()
        if any(address.startswith(prefix) for prefix in refuse):
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        parts = {}
        for part in message.walk():
            if part.get_content_maintype() == "text":
                parts[part.get_content_type()] = part.get_content()
        line = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "from": str(message["From"]),
            "to": str(message["To"]),
            "subject": str(message["Subject"]),
            "message_id": str(message["Message-ID"]),
            "content_type": message.get_content_type(),
            "parts": parts,
        }
        self.record.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.record.flush()
        _, bouncing = self.prefixes()
        for recipient in envelope.rcpt_tos:
            if any(recipient.startswith(prefix) for prefix in bouncing):
                # Later, as a real server finds out after accepting.
                threading.Timer(0.2, bounce, (self.bounce_relay, envelope.mail_from, recipient)).start()
        return "250 Message accepted for delivery"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", required=True)
    parser.add_argument("--refuse", action="append", default=[])
    parser.add_argument("--bounce", action="append", default=[])
    parser.add_argument("--bounce-relay", default="")
    parser.add_argument("--rules", default="", help="JSON {refuse: [...], bounce: [...]}, read when present")
    args = parser.parse_args()
    port = args.port
    if port == 0:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    controller = Controller(Recorder(args.record, args.refuse, args.bounce, args.bounce_relay, args.rules or None), hostname="127.0.0.1", port=port)
    controller.start()
    print(f"listening {port}", flush=True)
    try:
        asyncio.run(asyncio.Event().wait())
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
