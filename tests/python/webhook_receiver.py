"""A webhook receiver that is not Chukei's: it verifies every request with
the `standardwebhooks` and `svix` libraries (PyPI) and misbehaves on purpose.

    webhook_receiver.py --port PORT --secret whsec_... --out FILE [--script SPEC]

SPEC is a comma-separated list of what to do with successive requests; once
it is used up every request is accepted:

    503    answer 503 Service Unavailable with Retry-After: 0
    slow   wait --slow-secs before answering 200 (past the sender's timeout)
    crash  exit at once without answering (the test starts a new receiver)
    410    answer 410 Gone (and every request after it)

Each request that verifies is appended to FILE as one JSON line:
{"webhook_id": ..., "events": [...]} (before the answer, so a request the
sender gave up on is recorded too: the sender retries it). A request that
fails verification is recorded as {"bad_signature": ...} and answered 400.
"""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import standardwebhooks
import svix.webhooks


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--script", default="")
    parser.add_argument("--slow-secs", type=float, default=3.0)
    args = parser.parse_args()
    script = [step for step in args.script.split(",") if step]
    standard = standardwebhooks.Webhook(args.secret)
    svix_hook = svix.webhooks.Webhook(args.secret)
    gone = {"gone": False}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def answer(self, status, headers=()):
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            step = script.pop(0) if script else ("410" if gone["gone"] else "ok")
            if step == "crash":
                os._exit(3)
            if step == "410":
                gone["gone"] = True
                self.answer(410)
                return
            if step == "503":
                self.answer(503, [("Retry-After", "0")])
                return
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                payload = standard.verify(body, headers)
                svix_hook.verify(body, headers)
            except Exception as error:  # a failed check is the finding
                with open(args.out, "a", encoding="utf-8") as out:
                    out.write(json.dumps({"bad_signature": str(error)}) + "\n")
                self.answer(400)
                return
            with open(args.out, "a", encoding="utf-8") as out:
                out.write(
                    json.dumps(
                        {
                            "webhook_id": headers["webhook-id"],
                            "type": payload["type"],
                            "events": payload["data"],
                        }
                    )
                    + "\n"
                )
            if step == "slow":
                time.sleep(args.slow_secs)
            self.answer(204)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("listening", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
