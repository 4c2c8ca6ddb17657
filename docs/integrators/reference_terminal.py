#!/usr/bin/env python3
"""A minimal Chukei terminal endpoint in Python with the standard grpcio
library: the worked example of docs/integrators.md.

It serves chukei.terminal.v1.Terminal for any user a carrier pushes to:
every pushed message is confirmed with a DELIVERED event at once (again
when the same delivery is pushed again), a channel it cannot show is
answered UNSUPPORTED, and each message is "opened" --open-after-ms later
with a READ event on the pushing carrier's newest stream. Health
(grpc.health.v1) and reflection list exactly the Terminal service.

It uses grpcio's default server behaviour throughout: response headers go
out with the first event, not when the stream opens. The carrier must not
wait for them, and Chukei's does not.

    python3 -m pip install grpcio==1.76.0 grpcio-tools==1.76.0 \
        grpcio-health-checking==1.76.0 grpcio-reflection==1.76.0
    python3 docs/integrators/reference_terminal.py --listen 127.0.0.1:50091
    chukei-conformance terminal http://127.0.0.1:50091 --expect-reads

The Python stubs are generated from proto/ at start-up (grpc_tools), so
this file is all there is. Nothing here logs message content or who it
was for.
"""

import argparse
import importlib
import logging
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures
from importlib import resources


def load_stubs(proto_dir):
    """Generates terminal_pb2 / terminal_pb2_grpc from proto_dir and imports them."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="chukei-stubs-")
    well_known = str(resources.files("grpc_tools") / "_proto")
    for proto in ("chukei/common/v1/common.proto", "chukei/terminal/v1/terminal.proto"):
        code = protoc.main(
            [
                "protoc",
                f"-I{proto_dir}",
                f"-I{well_known}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                proto,
            ]
        )
        if code != 0:
            sys.exit(f"protoc failed on {proto} in {proto_dir}")
    sys.path.insert(0, out)
    return (
        importlib.import_module("chukei.terminal.v1.terminal_pb2"),
        importlib.import_module("chukei.terminal.v1.terminal_pb2_grpc"),
    )


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50091", help="host:port to serve on")
    parser.add_argument(
        "--proto-dir",
        default=os.path.join(here, "..", "..", "proto"),
        help="the directory holding chukei/… protos (default: the repository's proto/)",
    )
    parser.add_argument(
        "--open-after-ms", type=int, default=100, help="when each message is read (-1: never)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    pb, pb_grpc = load_stubs(args.proto_dir)
    service_name = pb.DESCRIPTOR.services_by_name["Terminal"].full_name
    # The channels this terminal shows (chukei.common.v1.Channel: RCS, SMS, SNS, e-mail).
    shown = {1, 2, 3, 4}

    class Terminal(pb_grpc.TerminalServicer):
        def __init__(self):
            self.lock = threading.Lock()
            self.received = {}  # delivery id -> (message id, user id, read at ms or None)
            self.carrier_of = {}  # delivery id -> the carrier that pushed it
            self.streams = {}  # carrier id -> the queue of its newest stream

        def event(self, delivery_id, kind, at_ms):
            message_id, user_id, _ = self.received[delivery_id]
            event = pb.TerminalEvent(
                delivery_id=delivery_id, message_id=message_id, user_id=user_id, kind=kind
            )
            event.at.FromMilliseconds(at_ms)
            return event

        def read_later(self, carrier_id, delivery_id):
            def fire():
                now = int(time.time() * 1000)
                with self.lock:
                    message_id, user_id, read_at = self.received[delivery_id]
                    if read_at is not None:
                        return
                    self.received[delivery_id] = (message_id, user_id, now)
                    events = self.streams.get(carrier_id)
                    if events is not None:
                        events.put([self.event(delivery_id, pb.EVENT_KIND_READ, now)])

            timer = threading.Timer(args.open_after_ms / 1000.0, fire)
            timer.daemon = True
            timer.start()

        def take(self, carrier_id, messages, events):
            """Answers one PushRequest's messages: confirmed now, read later."""
            now = int(time.time() * 1000)
            answer = []
            with self.lock:
                for m in messages:
                    if not m.delivery_id or not m.user_id:
                        logging.warning("push without a delivery or user id ignored")
                        continue
                    repeat = m.delivery_id in self.received
                    if not repeat:
                        self.received[m.delivery_id] = (m.message_id, m.user_id, None)
                        self.carrier_of[m.delivery_id] = carrier_id
                    if m.channel not in shown:
                        answer.append(self.event(m.delivery_id, pb.EVENT_KIND_UNSUPPORTED, now))
                        continue
                    # A repeat means the carrier lost our confirmation: confirm again.
                    answer.append(self.event(m.delivery_id, pb.EVENT_KIND_DELIVERED, now))
                    read_at = self.received[m.delivery_id][2]
                    if read_at is not None:
                        answer.append(self.event(m.delivery_id, pb.EVENT_KIND_READ, read_at))
                    elif not repeat and args.open_after_ms >= 0:
                        self.read_later(carrier_id, m.delivery_id)
            if answer:
                events.put(answer)

        def attach(self, carrier_id, events):
            """The carrier's newest stream: later READs go there, and every READ
            of its deliveries is sent again (one sent just before its previous
            stream broke may never have been recorded; the carrier drops repeats)."""
            with self.lock:
                self.streams[carrier_id] = events
                again = [
                    self.event(delivery_id, pb.EVENT_KIND_READ, read_at)
                    for delivery_id, (_, _, read_at) in self.received.items()
                    if read_at is not None and self.carrier_of.get(delivery_id) == carrier_id
                ]
            if again:
                events.put(again)

        def Push(self, request_iterator, context):
            events = queue.Queue()
            state = {"carrier": ""}
            # The carrier's priority stream (targeted messages only) answers
            # its own pushes; later READs stay on the carrier's main stream.
            priority = dict(context.invocation_metadata()).get("chukei-push-lane") == "priority"

            def consume():
                try:
                    for request in request_iterator:
                        if not state["carrier"] and request.carrier_id:
                            state["carrier"] = request.carrier_id
                            if not priority:
                                self.attach(request.carrier_id, events)
                        self.take(state["carrier"], request.messages, events)
                except grpc.RpcError:
                    pass
                events.put(None)

            threading.Thread(target=consume, daemon=True).start()
            logging.info("carrier stream open")
            while context.is_active():
                try:
                    batch = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if batch is None:
                    break
                yield pb.TerminalEvents(events=batch)
            logging.info("carrier stream closed")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    pb_grpc.add_TerminalServicer_to_server(Terminal(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", service_name):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    if server.add_insecure_port(args.listen) == 0:
        sys.exit(f"--listen {args.listen}: cannot bind")
    server.start()
    logging.info("reference terminal serving %s on %s", service_name, args.listen)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()


if __name__ == "__main__":
    main()
