"""WSGI apps that exercise every part of PEP 3333 that monodon's worker
provides, each wrapped in wsgiref's validator: a breach of the spec by the
server raises AssertionError in the app (a 500, and a traceback in the
log, which the tests look for)."""

import json
import os
import random
import sys
import tempfile
from wsgiref.validate import validator

# Where this module was imported: the template, or with --no-preload the worker.
IMPORTED_IN = os.getpid()
CLOSED = os.path.join(tempfile.gettempdir(), "monodon-wsgi-closed-%d" % os.getppid())


def respond(start_response, body, status="200 OK", content_type="application/json"):
    if not isinstance(body, bytes):
        body = (json.dumps(body) + "\n").encode()
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def environ_view(environ, start_response):
    cgi = {k: v for k, v in environ.items() if isinstance(v, str)}
    wsgi = {
        "version": list(environ["wsgi.version"]),
        "url_scheme": environ["wsgi.url_scheme"],
        "multithread": environ["wsgi.multithread"],
        "multiprocess": environ["wsgi.multiprocess"],
        "run_once": environ["wsgi.run_once"],
        "input_terminated": environ.get("wsgi.input_terminated"),
        "has_file_wrapper": "wsgi.file_wrapper" in environ,
    }
    environ["wsgi.errors"].write("environ seen for %s\n" % environ["PATH_INFO"])
    environ["wsgi.errors"].flush()
    return respond(start_response, {"cgi": cgi, "wsgi": wsgi, "pid": os.getpid(), "imported_in": IMPORTED_IN})


def read_body(environ, start_response):
    """Reads the body the way ?how= says; answers its digest."""
    how = environ["QUERY_STRING"].partition("how=")[2] or "read"
    stream = environ["wsgi.input"]
    lines = 0
    if how == "read":
        data = stream.read(int(environ.get("CONTENT_LENGTH") or 0) or 1 << 30)
    elif how == "read-small":
        parts = []
        while True:
            part = stream.read(1000)
            if not part:
                break
            parts.append(part)
        data = b"".join(parts)
    elif how == "readline":
        parts = []
        while True:
            line = stream.readline()
            if not line:
                break
            lines += 1
            parts.append(line)
        data = b"".join(parts)
    elif how == "readlines":
        got = stream.readlines()
        lines = len(got)
        data = b"".join(got)
    else:
        got = list(stream)
        lines = len(got)
        data = b"".join(got)
    return respond(start_response, {"length": len(data), "sum": sum(data) & 0xFFFFFFFF, "lines": lines})


def write_callable(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written ")
    write(b"through write()\n")
    return []


def stream(environ, start_response):
    count = int(environ["QUERY_STRING"].partition("n=")[2] or 5)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return (("part %d\n" % i).encode() for i in range(count))


def file_response(environ, start_response):
    size = int(environ["QUERY_STRING"].partition("size=")[2] or 100000)
    f = tempfile.TemporaryFile()
    f.write(bytes(i % 251 for i in range(size)))
    f.seek(0)
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](f, 8192)


def fails(environ, start_response):
    raise RuntimeError("this app fails on purpose")


def fails_after_start(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    try:
        raise ValueError("failed before the body")
    except ValueError:
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
    return [b"recovered with exc_info\n"]


class Closing:
    """A response whose close() the server must call."""

    def __init__(self):
        self.parts = [b"a\n", b"b\n"]

    def __iter__(self):
        return iter(self.parts)

    def close(self):
        with open(CLOSED, "a") as f:
            f.write("closed\n")


def closing(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Closing()


def closed_count(environ, start_response):
    try:
        with open(CLOSED) as f:
            n = len(f.readlines())
    except FileNotFoundError:
        n = 0
    return respond(start_response, {"closed": n})


def retire(environ, start_response):
    environ["monodon.retire"]()
    return respond(start_response, {"pid": os.getpid()})


def draw(environ, start_response):
    import time

    time.sleep(int(environ["QUERY_STRING"].partition("ms=")[2] or 0) / 1000)
    return respond(start_response, {"pid": os.getpid(), "random": random.random(), "post_fork": POST_FORKED})


def status(environ, start_response):
    code = environ["QUERY_STRING"].partition("code=")[2] or "404"
    return respond(start_response, b"status %s\n" % code.encode(), "%s Whatever" % code, "text/plain")


def sleep(environ, start_response):
    import time

    time.sleep(int(environ["QUERY_STRING"].partition("ms=")[2] or 100) / 1000)
    return respond(start_response, {"slept": True})


ROUTES = {
    "/environ": environ_view,
    "/body": read_body,
    "/write": write_callable,
    "/stream": stream,
    "/file": file_response,
    "/fail": fails,
    "/exc_info": fails_after_start,
    "/closing": closing,
    "/closed": closed_count,
    "/retire": retire,
    "/random": draw,
    "/status": status,
    "/sleep": sleep,
}


def routes(environ, start_response):
    handler = ROUTES.get(environ["PATH_INFO"], environ_view)
    return handler(environ, start_response)


POST_FORKED = []


def post_fork():
    """--post-fork hook: runs in each worker after the fork."""
    POST_FORKED.append(os.getpid())


application = validator(routes)
