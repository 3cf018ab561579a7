"""monodon's WSGI worker: runs a PEP 3333 application under the monodon
supervisor.

``monodon serve --wsgi package.module:app`` starts this file; it is not
meant to be run by hand. It speaks PROTOCOL.md's minimal profile: the
supervisor parses and validates every request head and hands over one
request at a time (``FEATURE_PARSED``), and this worker runs the app,
writes the response and hands the connection back. With templates (the
default) one process per generation imports the app and forks the
workers, so they share its memory and keep its code whatever changes on
disk.

Standard library only; Python 3.8 or later.
"""

import argparse
import bisect
import ctypes
import gc
import importlib
import io
import json
import mmap
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from email.utils import formatdate
from urllib.parse import unquote_to_bytes

# --- The protocol (PROTOCOL.md) -------------------------------------------

VERSION = 1
READY, DONE, RETIRING, PARSED = 2, 3, 4, 7
TEMPLATE_READY, FORK, FORKED, FORK_FAILED = 16, 17, 18, 19
FEATURE_PARSED = 2

CHANNEL_FD, SCOREBOARD_FD = 3, 4

# Scoreboard words (offsets / 8) and the request line's place.
BYTES_WRITTEN, REQUESTS, STARTED_MS, DRAINING = 0, 1, 2, 3
REQUEST_SEQ, REQUEST_LEN = 5, 6
REQUEST_LINE_AT, REQUEST_LINE_MAX = 56, 256
CONN_ID, CONN_BASE, HOLD_LIMIT = 41, 42, 43
RESPONSES = 44  # five words, 1xx to 5xx
DURATIONS = 49  # seventeen words, one per bucket
DURATION_SUM = 66
DURATION_BOUNDS_US = (
    100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000,
    500000, 1000000, 2500000, 5000000, 10000000,
)

PR_SET_PDEATHSIG = 1
MAX_DRAIN = 1 << 20
BODY_RATE_GRACE = 10  # seconds before --min-body-rate applies

REASONS = {
    400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
    500: "Internal Server Error",
}


class ProtocolError(Exception):
    """The supervisor sent something this worker cannot follow."""


class ClientError(Exception):
    """The client's body broke its framing, or stalled: answer `status`."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


def log(message):
    sys.stderr.write("monodon-wsgi[%d]: %s\n" % (os.getpid(), message))
    sys.stderr.flush()


def die_with_supervisor(supervisor_pid):
    """A worker must not outlive its supervisor (PROTOCOL.md, Start-up)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if supervisor_pid and os.getppid() != supervisor_pid:
        os._exit(1)


class Settings:
    """What the supervisor tells a worker in its environment."""

    def __init__(self, environ):
        def number(name, default):
            value = environ.get(name)
            if value is None:
                return default
            try:
                return int(value)
            except ValueError:
                raise SystemExit("%s=%r is not valid (see PROTOCOL.md)" % (name, value))

        self.supervisor_pid = number("MONODON_SUPERVISOR_PID", 0)
        self.generation = number("MONODON_GENERATION", 0)
        self.max_requests = number("MONODON_MAX_REQUESTS", 0)
        self.min_body_rate = number("MONODON_MIN_BODY_RATE", 0)
        self.io_timeout = max(1, number("MONODON_IO_TIMEOUT", 30))
        limits = environ.get("MONODON_LIMITS", "4094,8190,100,65536,1073741824,65536")
        try:
            fields = [int(f) for f in limits.split(",")]
            self.max_head, self.max_body, self.buffered_body = fields[3], fields[4], fields[5]
        except (ValueError, IndexError):
            raise SystemExit("MONODON_LIMITS=%r is not valid (see PROTOCOL.md)" % limits)
        self.access_log = environ.get("MONODON_ACCESS_LOG") or None
        self.access_log_format = environ.get("MONODON_ACCESS_LOG_FORMAT", "combined")

    def max_message(self):
        return 2 * self.max_head + self.buffered_body + 64 * 1024


# --- The scoreboard -------------------------------------------------------


class Scoreboard:
    """The worker's shared page: aligned 8-byte stores the supervisor reads
    (the minimal profile's fields, plus the optional response counts)."""

    def __init__(self, fd):
        self._map = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = memoryview(self._map).cast("Q")
        self.bytes = memoryview(self._map)

    def add(self, word, n):
        self.words[word] += n

    def begin_connection(self, conn_id):
        self.words[CONN_BASE] = self.words[BYTES_WRITTEN]
        self.words[CONN_ID] = conn_id

    def begin_request(self, line):
        line = line[:REQUEST_LINE_MAX]
        words = self.words
        words[REQUEST_SEQ] += 1  # odd: being written
        self.bytes[REQUEST_LINE_AT:REQUEST_LINE_AT + len(line)] = line
        words[REQUEST_LEN] = len(line)
        words[REQUEST_SEQ] += 1
        words[STARTED_MS] = max(1, int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1000))

    def end_request(self, status, took_us):
        words = self.words
        if 100 <= status <= 599:
            words[RESPONSES + status // 100 - 1] += 1
        words[DURATIONS + bisect.bisect_left(DURATION_BOUNDS_US, took_us)] += 1
        words[DURATION_SUM] += took_us
        words[STARTED_MS] = 0
        words[REQUESTS] += 1

    def draining(self):
        return self.words[DRAINING] != 0

    def limit_held(self):
        return self.words[HOLD_LIMIT] != 0


# --- Messages -------------------------------------------------------------


class Request:
    """A parsed request, as the supervisor sends it (PROTOCOL.md, Parsed
    requests)."""

    __slots__ = (
        "conn_id", "served", "client", "local", "https", "method", "target", "minor_version",
        "keep_alive", "expect_continue", "framing", "length", "body_complete",
        "headers", "body", "rest",
    )

    @classmethod
    def decode(cls, msg):
        if len(msg) < 2 or msg[0] != VERSION or msg[1] != PARSED:
            raise ProtocolError("expected a parsed request, got kind %r" % (bytes(msg[1:2]),))
        try:
            return cls._decode(msg)
        except (struct.error, IndexError, UnicodeDecodeError):
            raise ProtocolError("a parsed request cut short or malformed")

    @classmethod
    def _decode(cls, msg):
        r = cls()
        r.conn_id, r.served, n = _FIXED.unpack_from(msg, 2)
        at = 2 + _FIXED.size
        r.client = str(msg[at:at + n], "utf-8")
        at += n
        (n,) = _U16.unpack_from(msg, at)
        r.local = str(msg[at + 2:at + 2 + n], "utf-8")
        at += 2 + n
        r.minor_version, flags, r.framing, r.length, n = _SHAPE.unpack_from(msg, at)
        at += _SHAPE.size
        r.keep_alive = bool(flags & 1)
        r.expect_continue = bool(flags & 2)
        r.body_complete = bool(flags & 4)
        r.https = bool(flags & 8)
        r.method = str(msg[at:at + n], "latin-1")
        at += n
        (n,) = _U32.unpack_from(msg, at)
        r.target = str(msg[at + 4:at + 4 + n], "latin-1")
        at += 4 + n
        (count,) = _U16.unpack_from(msg, at)
        at += 2
        headers = []
        for _ in range(count):
            (n,) = _U16.unpack_from(msg, at)
            name = str(msg[at + 2:at + 2 + n], "latin-1")
            at += 2 + n
            (m,) = _U32.unpack_from(msg, at)
            headers.append((name, bytes(msg[at + 4:at + 4 + m])))
            at += 4 + m
        r.headers = headers
        (n,) = _U32.unpack_from(msg, at)
        r.body = bytes(msg[at + 4:at + 4 + n])
        if len(r.body) != n:
            raise ProtocolError("message truncated")
        r.rest = bytes(msg[at + 4 + n:])
        return r


_FIXED = struct.Struct("<QIH")  # connection id, served, client length
_SHAPE = struct.Struct("<BBBQH")  # minor version, flags, framing, length, method length
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_CUT_SHORT = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)


def send(channel, kind, payload=b""):
    channel.sendmsg([bytes((VERSION, kind)) + payload])


def receive(channel, buffer, max_fds):
    """One message (a view into `buffer`) and its fds; (None, []) once the
    channel is closed. Into a buffer kept across calls: a fresh one per
    message would be a large allocation (an mmap) each time."""
    fd_size = socket.CMSG_SPACE(max_fds * 4)
    n, ancillary, flags, _ = channel.recvmsg_into([buffer], fd_size, _RECV_FLAGS)
    fds = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack("%di" % (len(data) // 4), data[: len(data) // 4 * 4]))
    if flags & _CUT_SHORT or len(fds) > max_fds:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("message or its descriptors cut short")
    if n == 0 and not fds:
        return None, []
    return memoryview(buffer)[:n], fds


# --- wsgi.input -----------------------------------------------------------


class Input(io.RawIOBase):
    """The request body: what the supervisor buffered, then the connection;
    never past the body's end. Chunked bodies the supervisor did not have
    whole are decoded here, as strictly as the supervisor decodes them."""

    def __init__(self, request, sock, settings):
        super().__init__()
        self._sock = sock
        self._max_body = settings.max_body
        self._decoded = bytearray()
        self._done = False
        self._continue_pending = request.expect_continue and not request.body_complete
        self.extra = b""  # bytes read past the body: the next request's
        self.total = 0
        self.error = None  # a ClientError the app may have swallowed
        self._min_rate = settings.min_body_rate
        self._since = None
        self._received = 0
        if request.body_complete:
            self._decoded += request.body
            self._done = True
            self._mode = None
        elif request.framing == 1:
            self._mode = "length"
            self._remaining = request.length - len(request.body)
            self._decoded += request.body
        else:
            self._mode = "chunked"
            self._raw = bytearray(request.body)
            self._state = "size"
            self._chunk_left = 0
            self._trailer_bytes = 0

    def readable(self):
        return True

    @property
    def finished(self):
        return self._done

    def _recv(self):
        if self._continue_pending:
            self._continue_pending = False
            self._sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        # A client trickling its body holds a worker: past a grace period it
        # must average --min-body-rate, as for the Rust workers.
        now = time.monotonic()
        if self._since is None:
            self._since = now
        elapsed = now - self._since
        if self._min_rate and elapsed > BODY_RATE_GRACE and self._received < self._min_rate * elapsed:
            raise ClientError(408, "request body sent too slowly")
        try:
            data = self._sock.recv(65536)
        except socket.timeout:
            raise ClientError(408, "request body not received in time")
        if not data:
            raise ClientError(400, "the client closed the connection inside the body")
        self._received += len(data)
        return data

    def _fill(self):
        """Decodes at least one more byte, or finds the end."""
        try:
            self._fill_once()
        except ClientError as e:
            self.error = e
            raise

    def _fill_once(self):
        if self._mode == "length":
            data = self._recv()
            if len(data) > self._remaining:
                self.extra = data[self._remaining:]
                data = data[: self._remaining]
            self._remaining -= len(data)
            self._decoded += data
            self._done = self._remaining == 0
            return
        before = len(self._decoded)
        while not self._done and len(self._decoded) == before:
            if not self._step():
                self._raw += self._recv()

    def _line(self):
        end = self._raw.find(b"\n")
        if end < 0:
            if len(self._raw) > 4096:
                raise ClientError(400, "chunk size line too long")
            return None
        line = bytes(self._raw[: end + 1])
        del self._raw[: end + 1]
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise ClientError(400, "bare CR or LF in a chunked body")
        return line[:-2]

    def _step(self):
        """One step of the chunked decoder; False if it needs more bytes."""
        if self._state == "size":
            line = self._line()
            if line is None:
                return False
            size = line.split(b";", 1)[0]
            if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                raise ClientError(400, "bad chunk size")
            self._chunk_left = int(size, 16)
            if self.total + self._chunk_left > self._max_body:
                raise ClientError(413, "request body too large")
            self._state = "data" if self._chunk_left else "trailers"
            return True
        if self._state == "data":
            if not self._raw:
                return False
            n = min(len(self._raw), self._chunk_left)
            self._decoded += self._raw[:n]
            del self._raw[:n]
            self._chunk_left -= n
            self.total += n
            if self._chunk_left == 0:
                self._state = "crlf"
            return True
        if self._state == "crlf":
            if len(self._raw) < 2:
                return False
            if self._raw[:2] != b"\r\n":
                raise ClientError(400, "chunk data not followed by CRLF")
            del self._raw[:2]
            self._state = "size"
            return True
        # Trailer fields, up to the blank line; dropped, as the supervisor does.
        line = self._line()
        if line is None:
            return False
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > 65536:
            raise ClientError(431, "trailers too large")
        if line == b"":
            self._done = True
            self.extra = bytes(self._raw)
            self._raw = bytearray()
        return True

    def read(self, size=-1):
        if size is None or size < 0:
            while not self._done:
                self._fill()
            size = len(self._decoded)
        while len(self._decoded) < size and not self._done:
            self._fill()
        data = bytes(self._decoded[:size])
        del self._decoded[:size]
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readline(self, size=-1):
        while b"\n" not in self._decoded and not self._done:
            if size is not None and 0 <= size <= len(self._decoded):
                break
            self._fill()
        end = self._decoded.find(b"\n")
        end = len(self._decoded) if end < 0 else end + 1
        if size is not None and size >= 0:
            end = min(end, size)
        data = bytes(self._decoded[:end])
        del self._decoded[:end]
        return data

    def readlines(self, hint=-1):
        lines, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def drain(self, most):
        """Reads what is left of the body, up to `most` bytes: whether the
        body ended (so the connection can carry another request)."""
        if self._continue_pending:
            return False  # a body behind Expect: 100-continue that nobody asked for
        left = most
        while not self._done and left > 0:
            self._fill()
            left -= len(self._decoded)
            self._decoded.clear()
        return self._done


class CompleteBody(io.BytesIO):
    """wsgi.input for a body that came whole with the request."""

    finished = True
    extra = b""
    error = None

    def drain(self, most):
        return True


class Errors:
    """wsgi.errors: the supervisor's log (this process's stderr)."""

    def write(self, text):
        sys.stderr.write(text)

    def writelines(self, lines):
        sys.stderr.writelines(lines)

    def flush(self):
        sys.stderr.flush()


class FileWrapper:
    """wsgi.file_wrapper: a file the server may send with sendfile(2)."""

    def __init__(self, filelike, blksize=65536):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        return self

    def __next__(self):
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


# --- One exchange ---------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authenticate", "proxy-authorization"}


_date = [0, ""]


def http_date():
    """The Date header's value, made once a second."""
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, formatdate(now, usegmt=True)
    return _date[1]


def split_client(client):
    """`ip:port` / `[v6]:port` / `unix` as (REMOTE_ADDR, REMOTE_PORT)."""
    if client == "unix" or ":" not in client:
        return "", ""
    host, _, port = client.rpartition(":")
    return host.strip("[]"), port


class Exchange:
    """One request on one connection: the environ, the app, the response."""

    __slots__ = (
        "worker", "request", "sock", "status", "headers", "headers_sent", "chunked",
        "length_left", "sent_bytes", "status_code", "head_only", "bodiless", "retire", "pending_head",
        "keep",
    )

    def __init__(self, worker, request, sock):
        self.worker = worker
        self.request = request
        self.sock = sock
        self.status = None
        self.headers = None
        self.headers_sent = False
        self.chunked = False
        self.length_left = None
        self.sent_bytes = 0
        self.status_code = 0
        self.head_only = request.method == "HEAD"
        self.bodiless = False
        self.retire = False
        self.pending_head = None
        self.keep = False

    # The environ (PEP 3333).
    def environ(self, body):
        r = self.request
        path, _, query = r.target.partition("?")
        if "://" in path:  # absolute-form: the path is what follows the authority
            after = path.split("://", 1)[1]
            slash = after.find("/")
            path = after[slash:] if slash >= 0 else "/"
        path_info = unquote_to_bytes(path).decode("latin-1") if "%" in path else path
        remote_addr, remote_port = split_client(r.client)
        scheme = "https" if r.https else "http"
        if r.local != "unix":
            server_name, server_port = split_client(r.local)
        else:
            # A unix socket has no address of its own: the Host field names
            # the server, as the client saw it.
            host = next((v for n, v in r.headers if n.lower() == "host"), b"").decode("latin-1")
            name, _, port = host.rpartition(":") if host.rpartition(":")[2].isdigit() else (host, "", "")
            server_name = name.strip("[]") or "localhost"
            server_port = port or ("443" if r.https else "80")
        environ = {
            "REQUEST_METHOD": r.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path_info,
            "QUERY_STRING": query,
            "SERVER_NAME": server_name,
            "SERVER_PORT": server_port,
            "SERVER_PROTOCOL": "HTTP/1.%d" % r.minor_version,
            "REMOTE_ADDR": remote_addr,
            "REMOTE_PORT": remote_port,
            "REQUEST_URI": r.target,
            "RAW_URI": r.target,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": scheme,
            "wsgi.input": body,
            "wsgi.input_terminated": True,
            "wsgi.errors": self.worker.errors,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            "monodon.retire": self.ask_to_retire,
            "monodon.generation": self.worker.settings.generation,
        }
        policy = self.worker.underscore_headers
        dashed, underscored = [], []
        for name, value in r.headers:
            (underscored if "_" in name else dashed).append((name, value))
        if underscored and policy == "refuse":
            raise ClientError(400, "header name with an underscore: %s" % underscored[0][0])
        fields = dashed + (underscored if policy == "allow" else [])
        from_dash = set()
        for name, value in fields:
            key = name.upper().replace("-", "_")
            value = value.decode("latin-1")
            if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
                target = key
            else:
                target = "HTTP_" + key
            if "_" in name and target in from_dash:
                continue  # an underscore name never replaces a dash name
            if "_" not in name:
                from_dash.add(target)
            if target in environ and target.startswith("HTTP_"):
                sep = "; " if target == "HTTP_COOKIE" else ", "
                environ[target] += sep + value
            else:
                environ[target] = value
        return environ

    def ask_to_retire(self):
        """The app's wish that this worker leave after the response."""
        self.retire = True

    # start_response and write (PEP 3333).
    def start_response(self, status, headers, exc_info=None):
        if exc_info:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        code = status.split(" ", 1)[0]
        if len(code) != 3 or not code.isdigit():
            raise ValueError("status must be 'NNN reason', got %r" % status)
        self.status = status
        self.status_code = int(code)
        self.headers = list(headers)
        return self.write

    def send_head(self, known_length=None):
        r = self.request
        names = {n.lower(): v for n, v in self.headers}
        keep = r.keep_alive and not self.worker.board.draining()
        bodiless = self.status_code < 200 or self.status_code in (204, 304)
        lines = ["HTTP/1.%d %s" % (r.minor_version, self.status)]
        for name, value in self.headers:
            if name.lower() in HOP_BY_HOP:
                if name.lower() == "connection" and "close" in value.lower():
                    keep = False
                continue
            lines.append("%s: %s" % (name, value))
        if "date" not in names:
            lines.append("Date: " + http_date())
        self.bodiless = bodiless
        if bodiless:
            pass
        elif "content-length" in names:
            try:
                self.length_left = int(names["content-length"])
            except ValueError:
                keep = False
        elif known_length is not None:
            self.length_left = known_length
            lines.append("Content-Length: %d" % known_length)
        elif self.head_only:
            pass
        elif r.minor_version >= 1:
            self.chunked = True
            lines.append("Transfer-Encoding: chunked")
        else:
            keep = False
        if not keep:
            lines.append("Connection: close")
        elif r.minor_version == 0:
            lines.append("Connection: keep-alive")
        self.keep = keep
        self.headers_sent = True
        self.pending_head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send(self, data):
        # The head waits for the first piece of body, so that a small
        # response is one write.
        if self.pending_head is not None:
            data = self.pending_head + data
            self.pending_head = None
        # Counted before it goes out: a worker that dies mid-write must not
        # have the supervisor answer 502 after part of a response.
        self.worker.board.words[BYTES_WRITTEN] += len(data)
        self.sock.sendall(data)

    def flush(self):
        if self.pending_head is not None:
            self.send(b"")

    def nothing_sent(self):
        """No byte of the response has gone out: another can be sent."""
        return not self.headers_sent or self.pending_head is not None

    def write(self, data):
        if self.status is None:
            raise AssertionError("write() before start_response()")
        if not isinstance(data, bytes):
            raise TypeError("the body must be bytes, not %s" % type(data).__name__)
        if not self.headers_sent:
            self.send_head()
        if not data or self.head_only or self.bodiless:
            self.flush()
            return
        if self.length_left is not None:
            data = data[: max(0, self.length_left)]
            self.length_left -= len(data)
        self.sent_bytes += len(data)
        if self.chunked:
            self.send(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.send(data)

    def finish(self):
        if not self.headers_sent:
            self.send_head(known_length=0)
        if self.chunked and not self.head_only:
            self.send(b"0\r\n\r\n")
        self.flush()
        if self.length_left:
            self.keep = False  # the app sent less than it said: the client must not wait

    def sendfile(self, wrapper):
        """A file-like with a real fd goes out with sendfile(2)."""
        f = wrapper.filelike
        try:
            fd = f.fileno()
            start = f.tell() if hasattr(f, "tell") else 0
            size = os.fstat(fd).st_size - start
        except (AttributeError, OSError, io.UnsupportedOperation):
            return False
        if not self.headers_sent:
            self.send_head(known_length=size)
        if self.chunked:
            return False
        self.flush()
        if self.head_only:
            return True
        left = size if self.length_left is None else min(size, self.length_left)
        offset = start
        while left > 0:
            self.worker.board.add(BYTES_WRITTEN, left)
            try:
                sent = os.sendfile(self.sock.fileno(), fd, offset, left)
            except BlockingIOError:
                self.worker.board.add(BYTES_WRITTEN, -left)
                self.wait_writable()
                continue
            self.worker.board.add(BYTES_WRITTEN, sent - left)
            if sent == 0:
                break
            offset += sent
            left -= sent
            self.sent_bytes += sent
        if self.length_left is not None:
            self.length_left -= offset - start
        return True

    def wait_writable(self):
        import select
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLOUT)
        if not poller.poll(self.worker.settings.io_timeout * 1000):
            raise socket.timeout("the client does not read")


def refuse(sock, board, status, reason):
    """A response before the app saw the request (its body broke framing)."""
    body = ("%d %s: %s\n" % (status, REASONS.get(status, ""), reason)).encode()
    head = "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        status, REASONS.get(status, "Error"), len(body))
    data = head.encode() + body
    board.add(BYTES_WRITTEN, len(data))
    try:
        sock.sendall(data)
    except OSError:
        pass
    return len(data)


# --- The access log -------------------------------------------------------


class AccessLog:
    """The same lines the Rust workers write (proto/src/access_log.rs)."""

    def __init__(self, path, fmt):
        self.path, self.fmt = path, fmt
        self.file = None
        self.reopen()
        signal.signal(signal.SIGUSR1, lambda *_: self.reopen())

    def reopen(self):
        if self.path == "-":
            self.file = sys.stdout
        else:
            if self.file is not None:
                self.file.close()
            self.file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")

    def write(self, client, request, status, size, referer, agent, took_us, generation):
        version = "HTTP/1.%d" % request.minor_version
        if self.fmt == "json":
            line = json.dumps({
                "time": formatdate(usegmt=True), "peer": client, "method": request.method,
                "target": request.target, "version": version, "status": status, "bytes": size,
                "referer": referer, "user_agent": agent, "duration_us": took_us,
                "pid": os.getpid(), "generation": generation,
            }, separators=(",", ":"))
        else:
            host = client.rpartition(":")[0].strip("[]") if ":" in client else client
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())

            def quote(s):
                if s is None:
                    return "-"
                return "".join(
                    "\\" + c if c in '"\\' else ("\\x%02x" % ord(c) if ord(c) < 32 or ord(c) == 127 else c)
                    for c in s)

            line = '%s - - [%s] "%s %s %s" %d %d "%s" "%s" %d' % (
                host, stamp, quote(request.method), quote(request.target), version, status, size,
                quote(referer), quote(agent), took_us)
        self.file.write(line + "\n")


# --- The worker -----------------------------------------------------------


class Worker:
    def __init__(self, app, settings, underscore_headers):
        self.app = app
        self.settings = settings
        self.underscore_headers = underscore_headers
        self.errors = Errors()
        self.board = Scoreboard(SCOREBOARD_FD)
        self.channel = socket.socket(fileno=CHANNEL_FD)
        self.access_log = (
            AccessLog(settings.access_log, settings.access_log_format) if settings.access_log else None)
        left = settings.max_requests
        self.remaining = left if left > 0 else None

    def run(self):
        send(self.channel, READY, struct.pack("<IB", os.getpid(), FEATURE_PARSED))
        buffer = bytearray(self.settings.max_message())
        while True:
            msg, fds = receive(self.channel, buffer, 1)
            if msg is None:
                return 0
            if len(fds) != 1:
                raise ProtocolError("a request without its connection")
            request = Request.decode(msg)
            retiring = self.serve(request, fds[0])
            if retiring:
                return 0

    def serve(self, request, fd):
        """Serves one request; whether the worker leaves after it."""
        last = self.remaining is not None and self.remaining <= 1 and not self.board.limit_held()
        if last:
            send(self.channel, RETIRING)
        # The family from the supervisor's word: no probing of the socket.
        local = request.local
        family = socket.AF_UNIX if local == "unix" else socket.AF_INET6 if local.startswith("[") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
        sock.settimeout(self.settings.io_timeout)
        self.board.begin_connection(request.conn_id)
        self.board.begin_request(("%s %s" % (request.method, request.target)).encode("latin-1"))
        started = time.monotonic()
        exchange = Exchange(self, request, sock)
        keep, leftover = self.exchange(exchange, request, sock)
        took_us = int((time.monotonic() - started) * 1e6)
        self.board.end_request(exchange.status_code, took_us)
        if self.access_log is not None:
            fields = {n.lower(): v.decode("latin-1") for n, v in request.headers}
            self.access_log.write(
                request.client, request, exchange.status_code, exchange.sent_bytes,
                fields.get("referer"), fields.get("user-agent"), took_us, self.settings.generation)
        if self.remaining is not None:
            self.remaining -= 1
        # Our copy goes before the Done: a close is final once the
        # supervisor closes its own.
        sock.close()
        if exchange.retire and not last:
            send(self.channel, RETIRING)
        payload = struct.pack("<QIB", request.conn_id, request.served + 1, 1 if keep else 0)
        send(self.channel, DONE, payload + (leftover if keep else b""))
        return last or exchange.retire

    def exchange(self, exchange, request, sock):
        """Runs the app; (keep the connection?, bytes past the request)."""
        # A body the supervisor had whole is read from memory, by the C code
        # of BytesIO; only one still on the wire needs ours.
        body = CompleteBody(request.body) if request.body_complete else Input(request, sock, self.settings)
        try:
            environ = exchange.environ(body)
        except ClientError as e:
            exchange.status_code = e.status
            exchange.sent_bytes = refuse(sock, self.board, e.status, str(e))
            return False, b""
        result = None
        try:
            result = self.app(environ, exchange.start_response)
            wrapper = result if isinstance(result, FileWrapper) else None
            if wrapper is None or not exchange.sendfile(wrapper):
                if isinstance(result, (list, tuple)) and len(result) == 1 and exchange.status is not None \
                        and not exchange.headers_sent:
                    exchange.send_head(known_length=len(result[0]))
                for data in result:
                    exchange.write(data)
            if exchange.status is None:
                raise AssertionError("the app returned without calling start_response")
            exchange.finish()
        except ClientError as e:
            if not exchange.nothing_sent():
                return False, b""
            exchange.status_code = e.status
            exchange.sent_bytes = refuse(sock, self.board, e.status, str(e))
            return False, b""
        except (BrokenPipeError, ConnectionResetError):
            return False, b""  # the client went away: nothing to tell
        except (OSError, socket.timeout) as e:
            log("writing to %s: %s" % (request.client, e))
            return False, b""
        except Exception:
            log("the app failed on %s %s:\n%s" % (request.method, request.target, traceback.format_exc()))
            if exchange.nothing_sent():
                exchange.status_code = 500
                exchange.sent_bytes = refuse(sock, self.board, 500, "the app failed; see the log")
            return False, b""
        finally:
            if hasattr(result, "close"):
                try:
                    result.close()
                except Exception:
                    log("the response's close() failed:\n" + traceback.format_exc())
        keep = exchange.keep and body.error is None
        if keep and not body.finished:
            try:
                keep = body.drain(MAX_DRAIN)
            except (ClientError, OSError, socket.timeout):
                keep = False
        return keep, request.rest + body.extra


# --- Loading the app, and the template ------------------------------------


def load(spec):
    """`module:callable` (or `module`, whose `application` is taken)."""
    module_name, _, attribute = spec.partition(":")
    module = importlib.import_module(module_name)
    target = module
    for part in (attribute or "application").split("."):
        target = getattr(target, part)
    return target


def template(args, settings):
    """The template role (PROTOCOL.md, Templates): the app imported once,
    then a worker forked for each Fork, twice so that the supervisor (a
    child subreaper) is its parent."""
    app = None if args.no_preload else load(args.app)
    gc.collect()
    if hasattr(gc, "freeze"):
        gc.freeze()  # keep the collector from touching the shared pages
    channel = socket.socket(fileno=CHANNEL_FD)
    send(channel, TEMPLATE_READY, struct.pack("<I", os.getpid()))
    buffer = bytearray(1 << 16)
    while True:
        msg, fds = receive(channel, buffer, 2)
        if msg is None:
            return 0
        msg = bytes(msg)
        if msg[:2] != bytes((VERSION, FORK)) or len(fds) != 2:
            raise ProtocolError("expected Fork with two descriptors")
        variables, at = {}, 4
        for _ in range(struct.unpack_from("<H", msg, 2)[0]):
            n = struct.unpack_from("<H", msg, at)[0]
            name = msg[at + 2:at + 2 + n].decode()
            at += 2 + n
            m = struct.unpack_from("<I", msg, at)[0]
            variables[name] = msg[at + 4:at + 4 + m].decode()
            at += 4 + m
        if threading.active_count() > 1:
            send(channel, FORK_FAILED, b"the app started threads in the template; a fork copies only one")
        else:
            pid = fork_worker(fds, variables, app, args, settings)
            if pid:
                send(channel, FORKED, struct.pack("<I", pid))
            else:
                send(channel, FORK_FAILED, b"fork failed")
        for fd in fds:
            os.close(fd)


def fork_worker(fds, variables, app, args, settings):
    """Forks a worker through a middle process; its pid, or 0."""
    read_end, write_end = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return 0
    if middle == 0:
        os.close(read_end)
        try:
            worker = os.fork()
            if worker == 0:
                os.close(write_end)
                try:
                    code = become_worker(fds, variables, app, args, settings)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            os.write(write_end, struct.pack("<I", worker))
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    while len(data) < 4:
        chunk = os.read(read_end, 4 - len(data))
        if not chunk:
            break
        data += chunk
    os.close(read_end)
    os.waitpid(middle, 0)
    return struct.unpack("<I", data)[0] if len(data) == 4 else 0


def become_worker(fds, variables, app, args, settings):
    """In the forked worker: wait for the supervisor to adopt us, take the
    Fork's descriptors and variables, and serve."""
    deadline = time.monotonic() + 5
    while os.getppid() != settings.supervisor_pid:
        if time.monotonic() > deadline:
            return 1
        time.sleep(0.0002)
    os.dup2(fds[0], CHANNEL_FD)
    os.dup2(fds[1], SCOREBOARD_FD)
    for fd in fds:
        if fd not in (CHANNEL_FD, SCOREBOARD_FD):
            os.close(fd)
    os.environ.update(variables)
    os.environ.pop("MONODON_ROLE", None)
    return serve_as_worker(app if app is not None else load(args.app), args, Settings(os.environ))


def serve_as_worker(app, args, settings):
    die_with_supervisor(settings.supervisor_pid)
    random.seed()
    if args.post_fork:
        load(args.post_fork)()
    return Worker(app, settings, args.underscore_headers).run()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="monodon-wsgi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", required=True, help="module:callable")
    parser.add_argument("--post-fork", help="module:function called in each worker before it serves")
    parser.add_argument("--no-preload", action="store_true", help="import the app in each worker")
    parser.add_argument("--underscore-headers", choices=("drop", "refuse", "allow"), default="drop")
    args = parser.parse_args(argv)
    if os.environ.get("MONODON_CHANNEL_FD") is None:
        parser.error("started by `monodon serve --wsgi`, not by hand")
    # The app is found from the working directory (--chdir), as with
    # gunicorn, not from where this file lies.
    sys.path[0] = os.getcwd()
    settings = Settings(os.environ)
    if os.environ.get("MONODON_ROLE") == "template":
        return template(args, settings)
    die_with_supervisor(settings.supervisor_pid)
    return serve_as_worker(load(args.app), args, settings)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ProtocolError as e:
        log("protocol error: %s" % e)
        sys.exit(1)
