"""A downstream consumer of the provisioner's events, in plain kombu (no project imports).

    PROVISIONER_BROKER_URL=redis://localhost:6379/0 \\
        python examples/downstream_consumer.py [QUEUE] [--count N]

Binds its own durable queue (QUEUE, or $DOWNSTREAM_QUEUE) to ``tenant.provisioning.*`` on the
``tenant.events`` topic exchange, declared first (on Redis an undeclared exchange routes as
direct), and prints one line per event. The body is a structured-mode CloudEvent (JSON).
"""

import argparse
import json
import os

from kombu import Connection, Consumer, Exchange, Message, Queue

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("queue", nargs="?", default=os.environ.get("DOWNSTREAM_QUEUE", "downstream"))
parser.add_argument("--count", type=int, default=0, help="exit after N events (0: never)")
args = parser.parse_args()
events = Exchange("tenant.events", type="topic", durable=True)
queue = Queue(args.queue, exchange=events, routing_key="tenant.provisioning.*", durable=True)
seen = 0


def on_message(message: Message) -> None:
    global seen
    try:
        event = json.loads(message.body)
        data = event.get("data") or {}
        line = f"{event['type']} {event.get('subject')} attempt={data.get('attempt_number')}"
        print(f"{line} step={data.get('step') or data.get('failed_activity') or '-'}", flush=True)
        seen += 1
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"unreadable event: {exc}", flush=True)  # a real consumer would keep it aside
    message.ack()


with Connection(os.environ.get("PROVISIONER_BROKER_URL", "redis://localhost:6379/0")) as conn:
    channel = conn.default_channel
    events.bind(channel).declare()
    with Consumer(channel, queues=[queue], on_message=on_message, accept=None):
        print(f"listening on {args.queue}", flush=True)
        while not args.count or seen < args.count:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                continue
