#!/usr/bin/env python3
"""HTTP/1.1 conformance probes for a live server, every response linted by httplint.

Usage: http-conformance.py HOST:PORT EXPECTED_FILE

Each probe sends fixed bytes (normal requests, malformed ones, request-smuggling
shapes) on a fresh connection and reads every response until the server closes or
goes quiet. Two kinds of check:

- protocol (ours, one per probe): the statuses RFC 9110/9112 allow for that request,
  no extra response (an extra one means the body was taken for a new request: a
  desync), the connection closed where the RFC says it must be, and the header
  fields the RFC makes mandatory;
- lint (httplint's, one per response): its parser accepts the response's framing and
  its linter, given the request, has no WARN or BAD note.

A failed check is a finding, `PROBE ID` (ID: `status`, `framing-<Error>` or an
httplint note name). Findings listed in EXPECTED_FILE (`PROBE ID  reason`, PROBE `*`
for any) are accepted; any other fails the run (exit 1). An accepted finding that no
longer occurs is reported, not failed: delete its line. The score line counts checks
passed, and passed but for findings whose reason starts with "opinion". `-v` prints
every probe's statuses and every finding.
"""

import socket
import sys
import time

import httplint
from httplint import HttpRequestLinter, HttpResponseLinter
from httplint.note import levels
from thor.http.common import HttpMessageHandler, States

HOST = b"Host: localhost\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\n" + HOST + b"\r\n"  # answered 404 if ever parsed
OK, BAD = {200}, {400}


def req(line, *headers, body=b"", host=True):
    head = line + b"\r\n" + (HOST if host else b"") + b"".join(h + b"\r\n" for h in headers)
    return head + b"\r\n" + body


def post(*headers, body=b""):
    return req(b"POST /echo HTTP/1.1", *headers, body=body)


def chunked(*headers, body):
    return post(b"Transfer-Encoding: chunked", *headers, body=body)


# (name, request bytes, allowed status per final response, connection must close after,
#  header fields the last response must have). RFC sections are RFC 9112 unless noted.
PROBES = [
    # Normal requests.
    ("get", req(b"GET / HTTP/1.1"), [OK], False, ()),
    ("head", req(b"HEAD / HTTP/1.1"), [OK], False, ()),
    ("get-pid", req(b"GET /pid HTTP/1.1"), [OK], False, ()),
    ("get-sleep", req(b"GET /sleep?ms=10 HTTP/1.1"), [OK], False, ()),
    ("not-found", req(b"GET /nope HTTP/1.1"), [{404}], False, ()),
    # RFC 9110 15.5.6: a 405 MUST carry Allow.
    ("wrong-method", req(b"DELETE / HTTP/1.1"), [{405}], False, ("Allow",)),
    ("unknown-method", req(b"BREW / HTTP/1.1"), [{405, 501}], False, ()),
    ("options-asterisk", req(b"OPTIONS * HTTP/1.1"), [{200, 204, 405, 501}], False, ()),
    ("post-cl", post(b"Content-Length: 5", body=b"hello"), [OK], False, ()),
    ("post-empty", post(b"Content-Length: 0"), [OK], False, ()),
    ("post-no-length", post(), [{200, 411}], False, ()),  # 6.3: no CL/TE -> length 0
    ("post-chunked", chunked(body=b"5\r\nhello\r\n0\r\n\r\n"), [OK], False, ()),
    ("chunk-ext", chunked(body=b"5;a=b;c\r\nhello\r\n0\r\n\r\n"), [OK], False, ()),  # 7.1.1
    ("chunk-trailer", chunked(body=b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"), [OK], False, ()),
    ("te-case", post(b"Transfer-Encoding: CHUNKED", body=b"0\r\n\r\n"), [OK], False, ()),
    ("te-tab", post(b"Transfer-Encoding:\tchunked", body=b"0\r\n\r\n"), [OK], False, ()),
    ("expect-100", post(b"Expect: 100-continue", b"Content-Length: 5", body=b"hello"),
     [OK], False, ()),
    ("expect-unknown", req(b"GET / HTTP/1.1", b"Expect: tea"), [{200, 417}], False, ()),
    ("http10", req(b"GET / HTTP/1.0", host=False), [OK], True, ()),  # 9.3: 1.0 closes
    ("http10-keepalive", req(b"GET / HTTP/1.0", b"Connection: keep-alive", host=False),
     [OK], False, ()),
    ("connection-close", req(b"GET / HTTP/1.1", b"Connection: close"), [OK], True, ()),
    ("pipelined", req(b"GET / HTTP/1.1") * 3, [OK, OK, OK], False, ()),
    ("pipelined-post", post(b"Content-Length: 2", body=b"hi") + req(b"GET /pid HTTP/1.1"),
     [OK, OK], False, ()),
    ("after-close", req(b"GET / HTTP/1.1", b"Connection: close") + req(b"GET / HTTP/1.1"),
     [OK], True, ()),
    ("absolute-form", req(b"GET http://localhost/ HTTP/1.1"), [OK], False, ()),  # 3.2.2
    ("absolute-form-host", req(b"GET http://localhost/ HTTP/1.1", b"Host: other", host=False),
     [OK], False, ()),
    ("leading-crlf", b"\r\n" + req(b"GET / HTTP/1.1"), [OK], False, ()),  # 2.2 SHOULD
    ("version-1.2", req(b"GET / HTTP/1.2"), [{200, 505}], False, ()),  # RFC 9110 6.2
    # Malformed request lines: 400 (3, 3.2).
    ("version-2.0", req(b"GET / HTTP/2.0"), [{400, 505}], True, ()),
    ("version-junk", req(b"GET / HTTP/1.x"), [BAD], True, ()),
    ("version-lowercase", req(b"GET / http/1.1"), [BAD], True, ()),
    ("target-space", req(b"GET /a b HTTP/1.1"), [BAD], True, ()),
    ("method-bad-char", req(b"G(T / HTTP/1.1"), [BAD], True, ()),
    ("bare-lf", b"GET / HTTP/1.1\nHost: localhost\n\n", [{200, 400}], False, ()),  # 2.2 MAY
    ("uri-too-long", req(b"GET /" + b"a" * 20000 + b" HTTP/1.1"), [{400, 414, 431}], True, ()),
    # Malformed header sections.
    ("host-missing", req(b"GET / HTTP/1.1", host=False), [BAD], True, ()),  # 3.2 MUST
    ("host-duplicate", req(b"GET / HTTP/1.1", b"Host: localhost"), [BAD], True, ()),
    ("host-invalid", req(b"GET / HTTP/1.1", b"Host: a b", host=False), [BAD], True, ()),
    ("space-before-colon", req(b"GET / HTTP/1.1", b"X-A : 1"), [BAD], True, ()),  # 5.1 MUST
    ("header-no-colon", req(b"GET / HTTP/1.1", b"X-A"), [BAD], True, ()),
    ("header-name-bad", req(b"GET / HTTP/1.1", b"X@A: 1"), [BAD], True, ()),
    ("obs-fold", req(b"GET / HTTP/1.1", b"X-A: 1", b" 2"), [{200, 400}], False, ()),  # 5.2
    # RFC 9110 5.5: NUL in a value, and (2.2) a bare CR: reject, or replace with SP.
    ("header-nul", req(b"GET / HTTP/1.1", b"X-A: 1\x002"), [{200, 400}], False, ()),
    ("header-bare-cr", req(b"GET / HTTP/1.1", b"X-A: 1\r2"), [{200, 400}], False, ()),
    ("header-too-large", req(b"GET / HTTP/1.1", b"X-A: " + b"a" * 20000), [{400, 431}], True,
     ()),
    # Body framing (6.3): 400 and close, or as noted.
    ("cl-duplicate-differ", post(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"),
     [BAD], True, ()),
    ("cl-duplicate-same", post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"),
     [{200, 400}], False, ()),
    ("cl-list", post(b"Content-Length: 5, 5", body=b"hello"), [{200, 400}], False, ()),
    ("cl-plus", post(b"Content-Length: +5", body=b"hello"), [BAD], True, ()),
    ("cl-negative", post(b"Content-Length: -1"), [BAD], True, ()),
    ("cl-hex", post(b"Content-Length: 0x5", body=b"hello"), [BAD], True, ()),
    ("cl-overflow", post(b"Content-Length: 99999999999999999999999"), [{400, 413}], True, ()),
    ("cl-too-large", post(b"Content-Length: 2000000"), [{413}], True, ()),
    # 6.1: reject, or process as chunked and close.
    ("cl-and-te", chunked(b"Content-Length: 5", body=b"0\r\n\r\n"), [{200, 400}], True, ()),
    # 6.3: chunked not final -> 400 and close; 6.1: an unknown coding SHOULD get 501.
    # Either way closed; 7: chunked applied twice is as invalid.
    ("te-chunked-not-last", post(b"Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n"),
     [{400, 501}], True, ()),
    ("te-unknown", post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"), [{400, 501}],
     True, ()),
    ("te-gzip-chunked", post(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
     [{400, 501}], True, ()),
    ("te-chunked-twice", chunked(b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
     [{400, 501}], True, ()),
    ("te-space-before-colon", post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"), [BAD],
     True, ()),
    # 6.1: TE in a 1.0 request: faulty framing, close after processing it.
    ("te-http10", req(b"POST /echo HTTP/1.0", b"Transfer-Encoding: chunked",
                      body=b"0\r\n\r\n"), [{200, 400}], True, ()),
    ("chunk-size-bad", chunked(body=b"zz\r\nhello\r\n0\r\n\r\n"), [BAD], True, ()),
    ("chunk-size-negative", chunked(body=b"-5\r\nhello\r\n0\r\n\r\n"), [BAD], True, ()),
    ("chunk-size-overflow", chunked(body=b"f" * 20 + b"\r\nhello\r\n0\r\n\r\n"),
     [{400, 413}], True, ()),
    ("chunk-no-crlf", chunked(body=b"5\r\nhelloX0\r\n\r\n"), [BAD], True, ()),
    ("chunk-bare-lf", chunked(body=b"5\nhello\n0\n\n"), [{200, 400}], False, ()),
    # Request smuggling: the SMUGGLED request must never be answered.
    ("smuggle-cl-te", post(b"Content-Length: 4", b"Transfer-Encoding: chunked",
                           body=b"0\r\n\r\n" + SMUGGLED), [{200, 400}], True, ()),
    ("smuggle-te-cl", post(b"Transfer-Encoding: chunked", b"Content-Length: 3",
                           body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)),
     [{200, 400}], True, ()),
    ("smuggle-get-body", req(b"GET / HTTP/1.1", b"Content-Length: %d" % len(SMUGGLED),
                             body=SMUGGLED), [OK], False, ()),
    ("smuggle-te-cl-dup", post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity",
                               body=b"0\r\n\r\n" + SMUGGLED), [{400, 501}], True, ()),
]


class ResponseStream(HttpMessageHandler):
    "Splits a connection's bytes into responses with thor, the parser httplint's CLI uses."

    default_state = States.WAITING

    def __init__(self, request, head):
        super().__init__()
        self.request, self.head = request, head
        self.final, self.errors, self.linter = [], [], None

    def input_start(self, top_line, hdr_tuples, conn_tokens, transfer_codes, content_length):
        version, _, rest = top_line.partition(b" ")
        status, _, phrase = rest.partition(b" ")
        self.linter = HttpResponseLinter(start_time=time.time())
        self.linter.request = self.request
        self.linter.is_head_response = self.head
        self.linter.process_response_topline(version.partition(b"/")[2], status, phrase)
        self.linter.process_headers(hdr_tuples)
        interim = status.startswith(b"1")
        if interim:
            self.linter.finish_content(True)
        return not (interim or self.head or status in (b"204", b"304")), not interim

    def input_body(self, chunk):
        self.linter.feed_content(chunk)

    def input_end(self, trailers):
        self.linter.finish_content(True, trailers)
        self.final.append(self.linter)

    def input_error(self, err):
        self.errors.append(type(err).__name__)

    def output(self, data):  # parse-only
        raise NotImplementedError

    output_done = output


def request_linter(raw):
    "httplint's view of the probe's first request, for its request-aware response checks."
    head = raw.lstrip(b"\r\n").split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    method, _, rest = head[0].partition(b" ")
    target, _, version = rest.rpartition(b" ")
    linter = HttpRequestLinter()
    linter.process_request_topline(method, target, version.partition(b"/")[2])
    linter.process_headers([tuple(v.strip() for v in h.split(b":", 1)) for h in head[1:]
                            if b":" in h])
    return linter


def exchange(addr, raw, stream, enough, quiet, deadline=5.0):
    """Sends raw and feeds what comes back to stream until the server closes, or until
    it has been quiet for `quiet` s once enough() (or for `deadline` s in all).
    Returns whether the server closed the connection."""
    sock = socket.create_connection(addr, timeout=deadline)
    end = time.monotonic() + deadline
    try:
        try:
            sock.sendall(raw)
        except OSError:  # the server refused early and closed; read what it said
            pass
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(min(quiet, left) if enough() else left)
            try:
                got = sock.recv(65536)
            except socket.timeout:
                if enough():
                    return False
                continue
            except ConnectionResetError:
                return True
            if not got:
                return True
            stream.handle_input(got)
        return False
    finally:
        sock.close()


def run_probe(addr, raw, want, must_close, must_have, opinion):
    stream = ResponseStream(request_linter(raw), raw.lstrip(b"\r\n").startswith(b"HEAD "))
    enough = lambda: len(stream.final) >= len(want) or bool(stream.errors)
    # Waiting longer where a close is due costs nothing when it comes.
    closed = exchange(addr, raw, stream, enough, quiet=2.0 if must_close else 0.3)
    if closed and stream.linter and stream.linter not in stream.final and not stream.errors:
        stream.linter.finish_content(True)  # a close-delimited body
        stream.final.append(stream.linter)
    if closed and b"".join(stream._input_buffer).strip():  # pylint: disable=protected-access
        stream.errors.append("TrailingBytesError")  # e.g. a body after a HEAD response
    got = [r.status_code for r in stream.final]
    findings, detail = [], []
    if len(got) != len(want) or any(s not in w for s, w in zip(got, want)):
        detail.append(f"got statuses {got or 'none'}, allowed {[sorted(w) for w in want]}")
    if must_close and not closed:
        detail.append("connection left open, must be closed")
    missing = [h for h in must_have if stream.final and h.lower() not in
               {n.lower() for n, _ in stream.final[-1].headers.text}]
    if missing:
        detail.append(f"no {', '.join(missing)} header")
    if detail:
        findings.append(("status", "; ".join(detail)))
    for err in stream.errors:
        findings.append((f"framing-{err}", "httplint's parser rejects the response"))
    # Per check: passed, and passed but for findings accepted as httplint's opinions.
    checks = [(not detail, not detail)]
    for resp in stream.final:
        bad = [(type(n).__name__, f"{n.level.name}: {n.summary}") for n in resp.notes
               if n.level in (levels.WARN, levels.BAD)]
        checks.append((not bad and not stream.errors,
                       all(opinion(c) for c, _ in bad) and not stream.errors))
        findings += bad
    return findings, checks, got


def main():
    verbose = "-v" in sys.argv
    target, expected_file = [a for a in sys.argv[1:] if a != "-v"]
    host, port = target.rsplit(":", 1)
    expected = {}  # (probe or "*", check) -> reason
    for line in open(expected_file, encoding="utf-8"):
        if line.strip() and not line.lstrip().startswith("#"):
            probe, check, reason = (line.split(None, 2) + [""])[:3]
            expected[(probe, check)] = reason.strip()
    def opinion(name, check):
        return any(expected.get(k, "").startswith("opinion") for k in [(name, check), ("*", check)])

    checks = []
    new, used, accepted = [], set(), {"opinion": 0, "bug": 0}
    for name, raw, want, must_close, must_have in PROBES:
        findings, probe_checks, got = run_probe((host, int(port)), raw, want, must_close,
                                                must_have, lambda c, n=name: opinion(n, c))
        checks += probe_checks
        if verbose:
            print(f"  {name}: {got or 'no response'}")
        for check, text in dict(findings).items():
            key = next((k for k in [(name, check), ("*", check)] if k in expected), None)
            if key:
                used.add(key)
                accepted["opinion" if expected[key].startswith("opinion") else "bug"] += 1
            else:
                new.append((name, check))
            if verbose or not key:
                print(f"  {'accepted' if key else 'NEW':8} {name} {check}: {text}")
    for probe, check in sorted(set(expected) - used):
        print(f"  gone     {probe} {check}: no longer found; delete it from {expected_file}")
    print(f"http-conformance: httplint {httplint.__version__}: {sum(c[0] for c in checks)} of "
          f"{len(checks)} checks pass ({sum(c[1] for c in checks)} but for httplint's opinions; "
          f"{len(PROBES)} probes, {len(checks) - len(PROBES)} responses linted); findings "
          f"accepted: {accepted['opinion']} opinions, {accepted['bug']} known bugs; {len(new)} new")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
