#!/usr/bin/env python3
"""Helpers for bench/run (Python 3.11, stdlib only).

Subcommands (each bounded in time; bench/run calls them one at a time):
  freeport                      print a free TCP port on 127.0.0.1
  wait-ready PID PORT WORKERS   wait until PID has WORKERS children and GET / answers 200
  tree-rss PID                  print the RSS (KiB) of PID and all its descendants
  sample PID OUT                sample tree RSS every 0.5 s; on SIGTERM write the peak to OUT
  idle ...                      hold N idle keep-alive connections (scenario c)
  record ...                    parse one wrk output, append one JSON line to the raw file
  report RAW OUT ...            turn the raw file into the markdown tables
"""

import argparse
import json
import os
import re
import resource
import selectors
import signal
import socket
import statistics
import sys
import time

HOST = "127.0.0.1"
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


# ---------------------------------------------------------------- /proc ----

def _ppid_map():
    """pid -> ppid for every process (read from /proc/PID/stat)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # comm may hold spaces or ')': the fields we want follow the LAST ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        out[int(name)] = int(fields[1])
    return out


def tree_pids(pid):
    """pid and all its descendants (master + workers, any generation)."""
    children = {}
    for p, pp in _ppid_map().items():
        children.setdefault(pp, []).append(p)
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children.get(p, []))
    return seen


def _cpu_ticks(pid):
    """(its own user+system CPU, that of its reaped children), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0, 0
    fields = stat[stat.rfind(b")") + 2:].split()
    # After the command: state(0) ... utime(11) stime(12) cutime(13) cstime(14).
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def tree_cpu_secs(pid):
    """CPU seconds so far of the master itself, and of its workers: the live
    descendants and every one it has already reaped (recycled, reloaded)."""
    tick = os.sysconf("SC_CLK_TCK")
    own, reaped = _cpu_ticks(pid)
    workers = reaped + sum(sum(_cpu_ticks(p)) for p in tree_pids(pid) if p != pid)
    return {"master": own / tick, "workers": workers / tick}


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0  # gone, or a zombie (no VmRSS line)


def tree_rss_kib(pid):
    return sum(rss_kib(p) for p in tree_pids(pid))


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rfind(b")") + 2:][:1] != b"Z"
    except OSError:
        return False


# ------------------------------------------------------- small commands ----

def cmd_freeport(_a):
    s = socket.socket()
    s.bind((HOST, 0))
    print(s.getsockname()[1])
    s.close()


def http_get_ok(port):
    try:
        with socket.create_connection((HOST, port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello\n")
    except OSError:
        return False


def cmd_wait_ready(a):
    """Exit 0 when ready, 1 if the server died, 2 on timeout."""
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        if not alive(a.pid):
            return 1
        if len(tree_pids(a.pid)) - 1 >= a.workers and http_get_ok(a.port):
            # every worker up and one request served; let the rest settle
            time.sleep(0.5)
            return 0
        time.sleep(0.1)
    return 2


def cmd_tree_cpu(a):
    print(json.dumps(tree_cpu_secs(a.pid)))


def cmd_tree_rss(a):
    print(tree_rss_kib(a.pid))


def cmd_sample(a):
    """Peak tree RSS until SIGTERM (or --max-seconds, so it can never linger)."""
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    peak = 0
    deadline = time.monotonic() + a.max_seconds
    while not stop and time.monotonic() < deadline:
        peak = max(peak, tree_rss_kib(a.pid))
        time.sleep(0.5)
    peak = max(peak, tree_rss_kib(a.pid))
    with open(a.out, "w") as f:
        f.write(f"{peak}\n")


# ---------------------------------------------------- idle connections ----

def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def response_complete(buf):
    """True once buf holds a whole response head plus its Content-Length body."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", buf[:end])
    if m is None:
        return buf.endswith(b"hello\n")
    return len(buf) >= end + 4 + int(m.group(1))


def still_open(sock):
    """A non-blocking read: nothing to read yet means the server kept it open;
    EOF, a reset, or unexpected bytes (say a 408) mean it did not."""
    try:
        sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)  # EOF or bytes: not idle
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def cmd_idle(a):
    """Open N connections, one request+response on each, then hold them idle.

    Writes READY (JSON: opened, rss before/after) once they are all open, waits
    until the GO file exists (bench/run creates it when wrk is done) or
    --max-hold passes, then writes OUT (JSON: how many the server kept open).
    """
    limit = raise_nofile(a.n + 64)
    rss_before, master_before = tree_rss_kib(a.pid), rss_kib(a.pid)
    sel = selectors.DefaultSelector()
    done, failed, started = [], 0, 0
    deadline = time.monotonic() + a.open_timeout
    # At most --concurrency connections in flight, so a server with a small
    # backlog (or one that serves one connection at a time) is not flooded.
    while len(done) + failed < a.n and time.monotonic() < deadline:
        while started < a.n and len(sel.get_map()) < a.concurrency:
            s = socket.socket()
            s.setblocking(False)
            started += 1
            try:
                s.connect_ex((HOST, a.port))
            except OSError:  # out of fds, typically
                s.close()
                failed += 1
                continue
            sel.register(s, selectors.EVENT_WRITE, {"buf": b""})
        for key, mask in sel.select(timeout=0.5):
            s, st = key.fileobj, key.data
            try:
                if mask & selectors.EVENT_WRITE:  # connected (or failed to)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    s.send(REQUEST)  # tiny: fits a fresh socket's buffer
                    sel.modify(s, selectors.EVENT_READ, st)
                    continue
                chunk = s.recv(4096)
                if not chunk:
                    raise OSError("closed before a full response")
                st["buf"] += chunk
                if response_complete(st["buf"]):
                    sel.unregister(s)
                    done.append(s)
            except OSError:
                sel.unregister(s)
                s.close()
                failed += 1
    for key in list(sel.get_map().values()):  # timed out: give up on these
        key.fileobj.close()
        failed += 1
    sel.close()

    time.sleep(1)  # let the server settle before measuring it
    rss_after, master_after = tree_rss_kib(a.pid), rss_kib(a.pid)
    open_after = sum(still_open(s) for s in done)
    with open(a.ready + ".tmp", "w") as f:
        json.dump({"requested": a.n, "answered": len(done), "failed": failed,
                   "open_after_open": open_after, "rss_before_kib": rss_before,
                   "rss_after_kib": rss_after, "master_rss_before_kib": master_before,
                   "master_rss_after_kib": master_after, "nofile": limit}, f)
    os.rename(a.ready + ".tmp", a.ready)  # atomic: bench/run polls for it

    hold_until = time.monotonic() + a.max_hold
    while not os.path.exists(a.go) and time.monotonic() < hold_until:
        time.sleep(0.1)
    kept = sum(still_open(s) for s in done)
    for s in done:
        s.close()
    with open(a.out, "w") as f:
        json.dump({"kept": kept}, f)


# ------------------------------------------------------------ wrk output ----

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    return float(m.group(1)) * _UNIT_MS[m.group(2)] if m else None


def parse_wrk(text):
    r = {"rps": None, "p50_ms": None, "p99_ms": None, "requests": None,
         "non2xx": 0, "sock_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}}
    if m := re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M):
        r["rps"] = float(m.group(1))
    if m := re.search(r"^\s+50%\s+(\S+)", text, re.M):
        r["p50_ms"] = _ms(m.group(1))
    if m := re.search(r"^\s+99%\s+(\S+)", text, re.M):
        r["p99_ms"] = _ms(m.group(1))
    if m := re.search(r"^\s+(\d+) requests in", text, re.M):
        r["requests"] = int(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        r["non2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        r["sock_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    r["errors"] = r["non2xx"] + sum(r["sock_errors"].values())
    return r


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cmd_record(a):
    rec = {"server": a.server, "scenario": a.scenario, "repeat": a.repeat, "status": a.status}
    if a.reason:
        rec["reason"] = a.reason
    if a.status == "ok":
        with open(a.wrk) as f:
            rec.update(parse_wrk(f.read()))
        if rec["rps"] is None:
            rec["status"], rec["reason"] = "failed", "no wrk result"
        try:
            with open(a.peak) as f:
                rec["peak_rss_kib"] = int(f.read().strip())
        except (OSError, ValueError):
            rec["peak_rss_kib"] = None
        before, after = _read_json(a.cpu_before), _read_json(a.cpu_after)
        if before and after and rec.get("requests"):
            # Microseconds of CPU per request over the wrk run, master and workers.
            rec["cpu_us_per_req"] = {k: (after[k] - before[k]) * 1e6 / rec["requests"] for k in ("master", "workers")}
        rec["server_alive_after"] = a.alive == 1
        if not rec["server_alive_after"]:
            rec["status"], rec["reason"] = "failed", "server died during the run"
        if a.hups is not None:
            rec["hups_sent"] = a.hups
        if a.idle_ready:
            idle = _read_json(a.idle_ready) or {}
            idle.update(_read_json(a.idle_out) or {"kept": None})
            rec["idle"] = idle
    with open(a.raw, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


# --------------------------------------------------------------- report ----

SCENARIOS = {
    "a": "keep-alive",
    "b": "`Connection: close` (a new connection per request)",
    "c": "keep-alive while {idle} idle keep-alive connections are held open",
    "d": "keep-alive with a SIGHUP (reload) to the master every 2 s",
    "e": "keep-alive with workers recycled every 100 requests",
}


def _fmt_ms(v):
    if v is None:
        return "—"
    return f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms"


def _fmt_mib(kib):
    return "—" if kib is None else f"{kib / 1024:.1f} MiB"


def _fmt_cpu(rs):
    cpu = [r["cpu_us_per_req"] for r in rs if r.get("cpu_us_per_req")]
    if not cpu:
        return "—"
    master, workers = _median(c["master"] for c in cpu), _median(c["workers"] for c in cpu)
    return f"{master + workers:.1f} µs ({master:.1f} + {workers:.1f})"


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def cmd_report(a):
    recs = [json.loads(line) for line in open(a.raw) if line.strip()]
    servers, scenarios = a.servers.split(","), a.scenarios.split(",")
    lines = [
        "# monodon side-by-side benchmark",
        "",
        f"- date: {a.date}",
        f"- machine: nproc {a.nproc}, kernel {a.kernel}",
        f"- command: `{a.command}`",
        f"- load: `{a.wrk}` on 127.0.0.1, {a.workers} worker processes per server, "
        f"median of {a.repeats} interleaved repeat(s)",
        f"- versions: {a.versions}",
        "",
        "req/s ratio = this server's median req/s / nginx's median req/s in this run. "
        "errors = wrk non-2xx responses + socket errors (connect, read, write, timeout). "
        "peak RSS = the most the server's whole process tree (master + workers) held, "
        "sampled every 0.5 s. CPU/req = CPU time (user + system, from /proc/PID/stat) of the "
        "master + its workers over the wrk run, divided by the requests wrk completed; "
        "it counts only the server, not wrk, on a machine wrk shares. "
        "n/a = not applicable to that server; "
        "failed = see the raw results file. "
        "No server recycles workers in a-d (monodon: --max-requests-per-child 0); e recycles every 100.",
    ]
    for sc in scenarios:
        title = SCENARIOS[sc].format(idle=f"{int(a.idle):,}")
        extra = sc == "c"
        lines += ["", f"## {sc}: {title}", ""]
        head = "| server | req/s | ratio to nginx | p50 | p99 | errors | peak RSS | CPU/req (master + workers) |"
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
        if extra:
            head += " idle kept | KiB/idle conn |"
            rule += "---:|---:|"
        lines += [head, rule]
        ok = {s: [r for r in recs if r["server"] == s and r["scenario"] == sc and r["status"] == "ok"]
              for s in servers}
        nginx_rps = _median(r["rps"] for r in ok.get("nginx", []))
        for s in servers:
            rs = ok[s]
            if not rs:
                mine = [r for r in recs if r["server"] == s and r["scenario"] == sc]
                word = "n/a" if mine and all(r["status"] == "na" for r in mine) else "failed"
                lines.append(f"| {s} | {word} |" + " — |" * (6 + 2 * extra))
                continue
            rps = _median(r["rps"] for r in rs)
            ratio = f"{rps / nginx_rps:.2f}" if nginx_rps else "—"
            errs = _median(r["errors"] for r in rs)
            row = (f"| {s} | {rps:,.0f} | {ratio} | {_fmt_ms(_median(r['p50_ms'] for r in rs))} | "
                   f"{_fmt_ms(_median(r['p99_ms'] for r in rs))} | {errs:,.0f} | "
                   f"{_fmt_mib(_median(r.get('peak_rss_kib') for r in rs))} | "
                   f"{_fmt_cpu(rs)} |")
            if extra:
                idles = [r.get("idle") or {} for r in rs]
                kept = _median(i.get("kept") for i in idles)
                per = _median((i["rss_after_kib"] - i["rss_before_kib"]) / i["open_after_open"]
                              for i in idles if i.get("open_after_open"))
                row += (f" {'—' if kept is None else f'{kept:,.0f}'}/{int(a.idle):,} | "
                        f"{'n/a' if per is None else f'{per:.1f}'} |")
            lines.append(row)
    lines += ["", f"Total runtime: {a.runtime} s. Raw per-run results: `{a.raw_name}`.", ""]
    text = "\n".join(lines)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)


# ----------------------------------------------------------------- main ----

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("freeport").set_defaults(fn=cmd_freeport)

    q = sub.add_parser("wait-ready")
    q.add_argument("pid", type=int)
    q.add_argument("port", type=int)
    q.add_argument("workers", type=int)
    q.add_argument("--timeout", type=float, default=30)
    q.set_defaults(fn=cmd_wait_ready)

    q = sub.add_parser("tree-cpu")
    q.add_argument("pid", type=int)
    q.set_defaults(fn=cmd_tree_cpu)

    q = sub.add_parser("tree-rss")
    q.add_argument("pid", type=int)
    q.set_defaults(fn=cmd_tree_rss)

    q = sub.add_parser("sample")
    q.add_argument("pid", type=int)
    q.add_argument("out")
    q.add_argument("--max-seconds", type=float, default=600)
    q.set_defaults(fn=cmd_sample)

    q = sub.add_parser("idle")
    q.add_argument("--pid", type=int, required=True, help="server master pid (for RSS)")
    q.add_argument("--port", type=int, required=True)
    q.add_argument("--n", type=int, required=True)
    q.add_argument("--ready", required=True)
    q.add_argument("--go", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--concurrency", type=int, default=200)
    q.add_argument("--open-timeout", type=float, default=60)
    q.add_argument("--max-hold", type=float, default=300)
    q.set_defaults(fn=cmd_idle)

    q = sub.add_parser("record")
    for name in ("raw", "server", "scenario", "status"):
        q.add_argument("--" + name, required=True)
    q.add_argument("--repeat", type=int, required=True)
    for name in ("reason", "wrk", "peak", "idle-ready", "idle-out", "cpu-before", "cpu-after"):
        q.add_argument("--" + name)
    q.add_argument("--alive", type=int, default=1)
    q.add_argument("--hups", type=int)
    q.set_defaults(fn=cmd_record)

    q = sub.add_parser("report")
    q.add_argument("raw")
    q.add_argument("out")
    for name in ("servers", "scenarios", "date", "nproc", "kernel", "command", "wrk",
                 "workers", "repeats", "versions", "idle", "runtime", "raw-name"):
        q.add_argument("--" + name, required=True)
    q.set_defaults(fn=cmd_report)

    a = p.parse_args()
    sys.exit(a.fn(a) or 0)


if __name__ == "__main__":
    main()
