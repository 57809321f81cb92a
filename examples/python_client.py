#!/usr/bin/python3
"""A client of occamy in 60 lines, written from the README's message
contract (man occamy-protocol(7)) alone: publish a request with publisher
confirms, wait for its answer by correlation id, tell a result from an
error reply.  Debian: apt-get install python3-pika.

    python3 examples/python_client.py URI HANDLER BODY [TIMEOUT_S]

prints the result and exits 0, or prints the error reply's status and
reason to stderr and exits 65 (the request is invalid), 69 (no such
handler), 70 (it failed on every attempt) or 75 (no answer in time).
"""
import json
import sys
import uuid

import pika

EXIT = {"invalid_body": 65, "invalid_headers": 65, "invalid_task": 65, "rejected": 65,
        "unknown_handler": 69}  # anything else, e.g. internal_error: 70


class RequestFailed(Exception):
    def __init__(self, status, error):
        super().__init__(f"{status}: {error}")
        self.status, self.error = status, error


def submit(uri, handler, body, timeout=30.0, exchange="occamy.requests",
           routing_key="occamy.requests"):
    """Run one request; return the result (bytes) or raise RequestFailed,
    or TimeoutError if no answer came within timeout seconds."""
    conn = pika.BlockingConnection(pika.URLParameters(uri))
    try:
        ch = conn.channel()
        ch.confirm_delivery()  # basic_publish raises if the broker refuses it
        reply_queue = ch.queue_declare("", exclusive=True).method.queue
        cid = uuid.uuid4().hex
        ch.basic_publish(exchange, routing_key, body,
                         pika.BasicProperties(headers={"handler": handler},
                                              reply_to=reply_queue, correlation_id=cid,
                                              delivery_mode=2),
                         mandatory=True)
        for method, props, answer in ch.consume(reply_queue, auto_ack=True,
                                                inactivity_timeout=timeout):
            if method is None:
                raise TimeoutError(f"no answer within {timeout} s")
            if props.correlation_id != cid:
                continue  # a duplicate of an earlier request: at least once
            status = (props.headers or {}).get("x-occamy-status")
            if status is not None:
                error = json.loads(answer)["error"]
                raise RequestFailed(status, error)
            return answer
    finally:
        conn.close()


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    try:
        result = submit(sys.argv[1], sys.argv[2], sys.argv[3].encode(),
                        float(sys.argv[4]) if len(sys.argv) == 5 else 30.0)
    except RequestFailed as e:
        print(f"request failed: {e.status}: {e.error}", file=sys.stderr)
        sys.exit(EXIT.get(e.status, 70))
    except TimeoutError as e:
        print(e, file=sys.stderr)
        sys.exit(75)
    sys.stdout.buffer.write(result + b"\n")
