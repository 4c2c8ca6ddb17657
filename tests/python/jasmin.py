"""Jasmin 0.11.0 as the carrier's SMSC, for tests/tests/jasmin.rs.

Writes a Jasmin root (configuration on free local ports, the AMQP spec the
wheel lacks), starts jasmind with its DLR lookup and thrower, and provisions
it through jCli: --connectors SMPP client connectors to the downstream SMSC
on --smsc-port (each bound as a transceiver, submit_throughput unlimited:
Jasmin keeps one message in flight per connector), a round-robin route over
them, and the user the carrier binds as (--username/--password) on Jasmin's
SMPP server at --smpp-port. Prints "ready" once every connector is bound,
then runs until SIGTERM, when it stops jasmind.

RabbitMQ and Redis must run locally (guest/guest, 6379). Jasmin keeps
queues there; --redis-db keeps its keys apart from anything else's.

With --provision HOST:PORT it only provisions a Jasmin already running
(its jCli at HOST:PORT; the downstream SMSC at --smsc-host) and exits:
what deploy/compose.gateways.yaml runs against Jasmin's container.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

with warnings.catch_warnings():
    # telnetlib goes in Python 3.13; jCli is a telnet console and 3.11 has it.
    warnings.simplefilter("ignore", DeprecationWarning)
    import telnetlib


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def configure(root, args, ports):
    etc = os.path.join(root, "etc", "jasmin")
    os.makedirs(os.path.join(etc, "store"), exist_ok=True)
    os.makedirs(os.path.join(etc, "resource"), exist_ok=True)
    os.makedirs(os.path.join(root, "var", "log", "jasmin"), exist_ok=True)
    site = os.path.dirname(os.path.dirname(os.path.abspath(args.jasmind)))
    specs = [os.path.join(dirpath, name)
             for dirpath, _, names in os.walk(os.path.join(site, "lib"))
             for name in names if name == "amqp0-9-1.stripped.xml"]
    if not specs:
        sys.exit("the AMQP spec (txamqp's amqp0-9-1.stripped.xml) is not in the venv")
    shutil.copy(specs[0], os.path.join(etc, "resource", "amqp0-9-1.xml"))
    with open(os.path.join(etc, "jasmin.cfg"), "w", encoding="ascii") as cfg:
        cfg.write(f"""
[smpp-server]
bind = 127.0.0.1
port = {args.smpp_port}
[smpp-server-pb]
bind = 127.0.0.1
port = {ports['pb']}
[smpp-server-pb-client]
host = 127.0.0.1
port = {ports['pb']}
[client-management]
bind = 127.0.0.1
port = {ports['management']}
[router]
bind = 127.0.0.1
port = {ports['router']}
[http-api]
bind = 127.0.0.1
port = {ports['http']}
[jcli]
bind = 127.0.0.1
port = {ports['jcli'][1]}
[redis-client]
dbid = {args.redis_db}
[deliversm-thrower]
max_retries = 100
retry_delay = 2
# Jasmin drops a receipt it cannot map to its submit after
# dlr_lookup_max_retries lookups (default 2, 10 s apart); under load the
# mapping lags a prompt receipt by more than that. Throwing a receipt to a
# carrier that is rebinding gives up after 3 tries 30 s apart by default.
[dlr]
dlr_lookup_retry_delay = 2
dlr_lookup_max_retries = 150
[dlr-thrower]
max_retries = 150
retry_delay = 2
""")


def jcli(address, commands):
    """Runs jCli commands; exits naming the first one jCli refuses."""
    host, port = address
    console = telnetlib.Telnet(host, port, timeout=30)
    console.read_until(b"Authentication required.", timeout=30)
    time.sleep(0.2)
    console.write(b"jcliadmin\n")
    console.read_until(b"Password:", timeout=30)
    console.write(b"jclipwd\n")
    console.read_until(b"jcli : ", timeout=30)
    for command in commands:
        console.write(command.encode() + b"\n")
        # "jcli : " at the top level, "> " inside an add.
        _, _, answer = console.expect([rb"jcli : ", rb"> "], timeout=30)
        answer = answer.decode(errors="replace")
        if re.search(r"(?i)(error|unknown|invalid|cannot|not found)", answer):
            sys.exit(f"jCli refused {command!r}: {answer!r}")
    console.write(b"quit\n")
    console.close()


def provision(args, ports):
    commands = []
    names = [f"down{n}" for n in range(args.connectors)]
    for name in names:
        commands += [
            "smppccm -a", f"cid {name}", f"host {args.smsc_host}", f"port {args.smsc_port}",
            "username jasmin", "password jasmin", "bind transceiver",
            "submit_throughput 0", "ok",
            f"smppccm -1 {name}",
        ]
    commands += ["group -a", "gid carriers", "ok",
                 "user -a", f"username {args.username}", f"password {args.password}",
                 "gid carriers", "uid carrier", "ok"]
    if len(names) == 1:
        commands += ["mtrouter -a", "type defaultroute", f"connector smppc({names[0]})",
                     "rate 0.00", "ok"]
    else:
        connectors = ";".join(f"smppc({name})" for name in names)
        commands += ["filter -a", "type transparentfilter", "fid everything", "ok",
                     "mtrouter -a", "type randomroundrobinmtroute", "order 10",
                     f"connectors {connectors}", "filters everything", "rate 0.00", "ok",
                     "mtrouter -a", "type defaultroute", f"connector smppc({names[0]})",
                     "rate 0.00", "ok"]
    jcli(ports["jcli"], commands)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jasmind", help="the venv's jasmind.py")
    parser.add_argument("--root")
    parser.add_argument("--smpp-port", type=int)
    parser.add_argument("--provision", help="HOST:PORT of a running Jasmin's jCli")
    parser.add_argument("--smsc-host", default="127.0.0.1")
    parser.add_argument("--smsc-port", type=int, required=True)
    parser.add_argument("--connectors", type=int, default=4)
    parser.add_argument("--username", default="carrier")
    parser.add_argument("--password", default="secret")
    parser.add_argument("--redis-db", type=int, default=7)
    args = parser.parse_args()
    if args.provision:
        host, port = args.provision.rsplit(":", 1)
        deadline = time.time() + 300
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit(f"no jCli at {args.provision}")
                time.sleep(2)
        provision(args, {"jcli": (host, int(port))})
        print("provisioned", flush=True)
        return
    if not (args.jasmind and args.root and args.smpp_port):
        parser.error("--jasmind, --root and --smpp-port are needed unless --provision")
    ports = {name: free_port() for name in ("pb", "management", "router", "http")}
    ports["jcli"] = ("127.0.0.1", free_port())
    configure(args.root, args, ports)
    python = os.path.join(os.path.dirname(os.path.abspath(args.jasmind)), "python")
    log = open(os.path.join(args.root, "jasmind.out"), "w", encoding="utf-8")
    daemon = subprocess.Popen(
        [python, args.jasmind, "--username=jcliadmin", "--password=jclipwd",
         "--enable-dlr-lookup", "--enable-dlr-thrower"],
        cwd=args.root, env={**os.environ, "ROOT_PATH": args.root},
        stdout=log, stderr=subprocess.STDOUT)

    def stop(*_):
        daemon.terminate()
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    deadline = time.time() + 90
    while True:
        if daemon.poll() is not None:
            sys.exit(f"jasmind exited ({daemon.returncode}); see {args.root}/jasmind.out")
        try:
            socket.create_connection(ports["jcli"], timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                stop()
            time.sleep(0.5)
    provision(args, ports)
    print("ready", flush=True)
    while daemon.poll() is None:
        time.sleep(0.5)
    sys.exit(f"jasmind exited ({daemon.returncode}); see {args.root}/jasmind.out")


if __name__ == "__main__":
    main()
