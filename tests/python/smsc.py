"""A scripted SMSC: an SMPP 3.4 server for the carrier's SMS gateway tests.

It binds any ESME (transceiver, transmitter or receiver), answers
enquire_link, answers each submit_sm with a message id — in hex or in
decimal (--ids) — and sends a delivery receipt for it after --receipt-delay,
naming the id in the *other* base when --cross-base is set (what some SMSCs
do, and what made Jasmin lose receipts, jookies/jasmin#643). A receipt not
acknowledged (deliver_sm_resp) before the session ends is sent again on the
next bind, as an SMSC keeps receipts for an ESME that is away.

Rules by destination prefix: --refuse PREFIX answers ESME_RINVDSTADR,
--undeliverable PREFIX reports stat:UNDELIV. --throttle-every N answers
every Nth submit_sm with ESME_RTHROTTLED.

Every part taken is appended to --record as a JSON line: destination, data
coding, the concatenation header (reference, total, number) or null, and
the text decoded (GSM 7-bit unpacked or UCS-2). Prints "listening PORT"
once ready.
"""

import argparse
import asyncio
import itertools
import json
import random
import struct
import sys
import time

GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENDED = {0x0A: "\f", 0x14: "^", 0x28: "{", 0x29: "}", 0x2F: "\\", 0x3C: "[",
                0x3D: "~", 0x3E: "]", 0x40: "|", 0x65: "€"}

BIND_RECEIVER, BIND_TRANSMITTER, SUBMIT_SM, DELIVER_SM = 0x01, 0x02, 0x04, 0x05
UNBIND, BIND_TRANSCEIVER, ENQUIRE_LINK = 0x06, 0x09, 0x15
RESP = 0x80000000
ESME_ROK, ESME_RINVDSTADR, ESME_RTHROTTLED = 0x00, 0x0B, 0x58


def decode_gsm(data):
    out, escape = [], False
    for byte in data:
        if escape:
            out.append(GSM_EXTENDED.get(byte, "?"))
            escape = False
        elif byte == 0x1B:
            escape = True
        else:
            out.append(GSM_BASIC[byte] if byte < len(GSM_BASIC) else "?")
    return "".join(out)


def cstring(body, at):
    end = body.index(b"\0", at)
    return body[at:end].decode("latin-1"), end + 1


def parse_sm(body):
    """The fields of a submit_sm body this SMSC looks at."""
    at = 0
    _service, at = cstring(body, at)
    at += 2
    _source, at = cstring(body, at)
    at += 2
    destination, at = cstring(body, at)
    esm_class = body[at]
    at += 3
    _schedule, at = cstring(body, at)
    _validity, at = cstring(body, at)
    at += 2
    data_coding = body[at]
    at += 2
    length = body[at]
    at += 1
    message = body[at:at + length]
    return destination, esm_class, data_coding, message


def pdu(command_id, status, sequence, body=b""):
    return struct.pack(">IIII", 16 + len(body), command_id, status, sequence) + body


def receipt_body(destination, message_id, stat, err):
    now = time.strftime("%y%m%d%H%M")
    text = (f"id:{message_id} sub:001 dlvrd:{'001' if stat == 'DELIVRD' else '000'} "
            f"submit date:{now} done date:{now} stat:{stat} err:{err} text:").encode()
    return (b"\0" + b"\1\1" + destination.encode() + b"\0" + b"\0\0" + b"Chukei\0"
            + bytes([0x04, 0, 0]) + b"\0\0" + bytes([0, 0, 0, 0]) + bytes([len(text)]) + text)


class Smsc:
    def __init__(self, args):
        self.args = args
        self.ids = itertools.count(args.first_id)
        self.submits = 0
        self.record = open(args.record, "a", encoding="utf-8") if args.record else None
        # Receipts not yet acknowledged by any session, oldest first.
        self.pending = []
        self.receivers = []
        self.wake = asyncio.Event()

    def id_text(self, number, other_base=False):
        hex_ids = self.args.ids == "hex"
        if other_base:
            hex_ids = not hex_ids
        return format(number, "X") if hex_ids else str(number)

    async def serve(self, reader, writer):
        session = {"writer": writer, "bound": False, "receives": False, "unacked": {},
                   "sequence": itertools.count(1)}
        sender = asyncio.create_task(self.send_receipts(session))
        try:
            while True:
                header = await reader.readexactly(16)
                length, command_id, _status, sequence = struct.unpack(">IIII", header)
                body = await reader.readexactly(length - 16)
                await self.handle(session, command_id, sequence, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            sender.cancel()
            if session in self.receivers:
                self.receivers.remove(session)
            # What this session never acknowledged goes to the next one.
            self.pending[:0] = list(session["unacked"].values())
            if self.pending:
                self.wake.set()
            writer.close()

    async def handle(self, session, command_id, sequence, body):
        writer = session["writer"]
        if command_id in (BIND_RECEIVER, BIND_TRANSMITTER, BIND_TRANSCEIVER):
            session["bound"] = True
            if command_id != BIND_TRANSMITTER:
                session["receives"] = True
                self.receivers.append(session)
                self.wake.set()
            writer.write(pdu(command_id | RESP, ESME_ROK, sequence, b"pysmsc\0"))
        elif command_id == ENQUIRE_LINK:
            writer.write(pdu(ENQUIRE_LINK | RESP, ESME_ROK, sequence))
        elif command_id == UNBIND:
            writer.write(pdu(UNBIND | RESP, ESME_ROK, sequence))
        elif command_id == DELIVER_SM | RESP:
            session["unacked"].pop(sequence, None)
        elif command_id == SUBMIT_SM:
            self.submit(session, sequence, body)
        elif command_id & RESP:
            pass
        else:
            writer.write(pdu(RESP, 0x03, sequence))
        await writer.drain()

    def submit(self, session, sequence, body):
        destination, esm_class, data_coding, message = parse_sm(body)
        self.submits += 1
        args = self.args
        if args.throttle_every and self.submits % args.throttle_every == 0:
            session["writer"].write(pdu(SUBMIT_SM | RESP, ESME_RTHROTTLED, sequence, b"\0"))
            return
        if args.refuse and destination.startswith(args.refuse):
            session["writer"].write(pdu(SUBMIT_SM | RESP, ESME_RINVDSTADR, sequence, b"\0"))
            return
        number = next(self.ids)
        message_id = self.id_text(number)
        udh = None
        if esm_class & 0x40 and len(message) > 6 and message[0] == 5:
            udh = [message[3], message[4], message[5]]
            message = message[6:]
        text = message.decode("utf-16-be") if data_coding == 8 else decode_gsm(message)
        if self.record:
            self.record.write(json.dumps({"destination": destination, "data_coding": data_coding,
                                          "udh": udh, "text": text, "id": message_id},
                                         ensure_ascii=False) + "\n")
            self.record.flush()
        session["writer"].write(pdu(SUBMIT_SM | RESP, ESME_ROK, sequence,
                                    message_id.encode() + b"\0"))
        undeliverable = args.undeliverable and destination.startswith(args.undeliverable)
        stat, err = ("UNDELIV", "001") if undeliverable else ("DELIVRD", "000")
        reported = self.id_text(number, other_base=args.cross_base)
        receipt = receipt_body(destination, reported, stat, err)
        asyncio.get_running_loop().call_later(args.receipt_delay, self.queue, receipt)

    def queue(self, receipt):
        self.pending.append(receipt)
        self.wake.set()

    async def send_receipts(self, session):
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending and self.receivers:
                target = self.receivers[0]
                receipt = self.pending.pop(0)
                sequence = next(target["sequence"]) + 1_000_000
                target["unacked"][sequence] = receipt
                target["writer"].write(pdu(DELIVER_SM, ESME_ROK, sequence, receipt))
                try:
                    await target["writer"].drain()
                except ConnectionError:
                    break


async def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ids", choices=["hex", "dec"], default="hex")
    parser.add_argument("--cross-base", action="store_true")
    # Each run's ids start somewhere new: Jasmin keeps its id -> submit
    # mapping in Redis (`queue-msgid:<id>`, db 0, for a day), and a receipt
    # that beat its submit_sm_resp was mapped to an earlier run's submit
    # with the same id, thrown to that run's dead carrier and lost.
    parser.add_argument("--first-id", type=int,
                        default=random.randrange(0x10000, 0x7000_0000))
    parser.add_argument("--receipt-delay", type=float, default=0.2)
    parser.add_argument("--refuse", default="")
    parser.add_argument("--undeliverable", default="")
    parser.add_argument("--throttle-every", type=int, default=0)
    parser.add_argument("--record", default="")
    args = parser.parse_args()
    smsc = Smsc(args)
    server = await asyncio.start_server(smsc.serve, args.host, args.port)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
