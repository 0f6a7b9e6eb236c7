"""Issue 10: nothing lost, nothing leaked, nothing hangs -- one test per item, through the CLI
against the sandbox, or against a small misbehaving server started here on 127.0.0.1."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import os
import socket
import sqlite3
import subprocess
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import event, make_config, run_subprocess, write_ndjson

from didomi_marketo.didomi.readers import InputFile, Problem, read_records
from didomi_marketo.state import StateLock

TOKEN = "tok-3f1c9a7e-5b2d-4e8f-a1c0-77d2e9b4c6aa:int"
SECRET = "s3cret+/with=odd&chars-0123456789"


def leads_json(tmp_path: Path, n: int) -> str:
    path = tmp_path / "leads.json"
    path.write_text(json.dumps([{"email": f"u{i}@example.com"} for i in range(n)]))
    return str(path)


def events(tmp_path: Path, n: int, name: str = "in/events.ndjson") -> Path:
    return write_ndjson(
        tmp_path / name,
        [event(f"u{i}@example.com", "2026-11-01T00:00:00Z", {"newsletter": True}) for i in range(n)],
    )


def summary(report: Path) -> dict[str, Any]:
    return json.loads((report / "summary.json").read_text())


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------------------------------------
# A small misbehaving Marketo: a real server on loopback, each route a function of the request.

Route = Callable[["_Handler", bytes], None]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        self.server.seen.append((self.command, self.path, dict(self.headers), body))
        route = self.server.routes.get(path)
        if route is None:
            self.reply(404, b"{}")
        else:
            route(self, body)

    do_GET = do_POST = _serve

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            **(headers or {}),
        }.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Route]
    seen: list[tuple[str, str, dict[str, str], bytes]]


def token_route(handler: _Handler, body: bytes) -> None:
    handler.reply(
        200, json.dumps({"access_token": TOKEN, "token_type": "bearer", "expires_in": 3599}).encode()
    )


def all_updated(handler: _Handler, body: bytes) -> None:
    n = len(json.loads(body)["input"])
    result = [{"id": i + 1, "status": "updated"} for i in range(n)]
    handler.reply(200, json.dumps({"requestId": "r", "success": True, "result": result}).encode())


@pytest.fixture
def hostile() -> Iterator[Callable[..., _Server]]:
    """Start a misbehaving Marketo with the given routes (a token route is added)."""
    servers: list[_Server] = []

    def start(**routes: Route) -> _Server:
        srv = _Server(("127.0.0.1", 0), _Handler)
        srv.routes = {"/identity/oauth/token": token_route, "/rest/v1/leads.json": all_updated}
        srv.routes.update(
            {"/" + k.replace("__", "/").replace("_json", ".json"): v for k, v in routes.items()}
        )
        srv.seen = []
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def hostile_config(tmp_path: Path, srv: _Server, **delivery: Any) -> Path:
    cfg = {
        "type_id": "marketo",
        "authentication": {"client_id": "cid", "client_secret": SECRET,
                           "instance": f"http://127.0.0.1:{srv.server_address[1]}/rest"},
        "properties": {"user_identifier": ["email"]},
        "mappings": [{"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"}],
        "delivery": {"retry_min_attempts": 1, "retry_min_seconds": 0.01, **delivery},
    }  # fmt: skip
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(cfg))
    return path


QUICK = {"delivery": {"retry_min_attempts": 1, "retry_min_seconds": 0.01}}


# ---------------------------------------------------------------------------------------------
# 3. A proxy that answers 413 to everything


def test_3_a_proxy_answering_413_to_everything_leaves_every_lead_retryable(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=leads_json(tmp_path, 490))
    events(tmp_path, 490)
    config = make_config(tmp_path, sb, **QUICK)
    state = tmp_path / "state.db"
    sb.inject_rate("http:413", 1.0)
    res = cli("sync", tmp_path / "in", "-c", config, "--state", state, "--report", tmp_path / "r", "-q")
    assert res.exit_code == 1
    d = summary(tmp_path / "r")["delivery"]
    assert d["splits"] == 0 and d["calls"] <= 4  # 2 batches, each sent twice: never 978 calls
    assert d["failed_retryable"] == 490 and not d["skipped"]
    assert {u["code"] for u in lines(tmp_path / "r" / "undelivered.ndjson")} == {"proxy_413"}
    sb.clear_faults()
    res = cli("sync", tmp_path / "in", "-c", config, "--state", state, "-q")  # the next cron run
    assert res.exit_code == 0
    assert all(sb.lead_by_email(f"u{i}@example.com")["didomiNewsletterOptIn"] is True for i in range(490))


# ---------------------------------------------------------------------------------------------
# 4. Deep nesting


def test_4_a_deeply_nested_record_is_rejected_at_its_line_and_the_rest_lands(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=leads_json(tmp_path, 3))
    events(tmp_path, 3)
    deep = tmp_path / "in" / "deep.ndjson"
    good = json.dumps(event("u2@example.com", "2026-11-02T00:00:00Z", {"newsletter": False}))
    deep.write_text(good + "\n" + "[" * 1000 + "]" * 1000 + "\n" + '{"a":' * 995 + "1" + "}" * 995 + "\n")
    (tmp_path / "in" / "deep_doc.json").write_text("[\n" + "[" * 1000 + "]" * 1000 + "\n]\n")
    res = cli("sync", tmp_path / "in", "-c", make_config(tmp_path, sb), "--report", tmp_path / "r", "-q")
    assert res.exit_code == 1, res.stderr
    assert f"{deep}:2: nested too deeply" in res.stderr and f"{deep}:3: nested too deeply" in res.stderr
    assert "deep_doc.json:1: nested too deeply" in res.stderr and "Traceback" not in res.stderr
    assert summary(tmp_path / "r")["input"]["rejected"] == 3
    assert sb.lead_by_email("u0@example.com")["didomiNewsletterOptIn"] is True
    assert sb.lead_by_email("u2@example.com")["didomiNewsletterOptIn"] is False  # the later record


# ---------------------------------------------------------------------------------------------
# 5. Lead ids outside Marketo's range


def test_5_lead_ids_outside_marketos_range_are_rejected_at_their_line(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory()
    (lead_id,) = sb.seed_leads([{"email": "a@example.com"}])
    data = write_ndjson(tmp_path / "ids.ndjson", [
        event(str(lead_id), "2026-11-01T00:00:00Z", {"newsletter": True}),
        event("1" * 25, "2026-11-01T00:00:00Z", {"newsletter": True}),
        event("9" * 5000, "2026-11-01T00:00:00Z", {"newsletter": True}),
        event(str(2**31), "2026-11-01T00:00:00Z", {"newsletter": True}),
    ])  # fmt: skip
    config = make_config(tmp_path, sb, properties={"user_identifier": ["leadID"]})
    dry = cli("sync", data, "-c", config, "--dry-run", "-q")
    assert dry.exit_code == 1 and "Traceback" not in dry.stderr
    res = cli("sync", data, "-c", config, "-q")
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    for line in (2, 3, 4):
        assert f"{data}:{line}: organization_user_id" in res.stderr
    assert "2147483647" in res.stderr and len(res.stderr) < 2000  # a 5,000-digit id is cut short
    assert sb.lead_by_email("a@example.com")["didomiNewsletterOptIn"] is True


# ---------------------------------------------------------------------------------------------
# 6. FIFOs, sockets and devices


def test_6_a_fifo_or_socket_in_a_folder_is_skipped_and_counted(sandbox_factory, tmp_path):
    sb = sandbox_factory(leads_file=leads_json(tmp_path, 2))
    events(tmp_path, 2)
    os.mkfifo(tmp_path / "in" / "pipe.ndjson")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "in" / "sock.ndjson"))
    try:
        state = tmp_path / "s.db"
        res = run_subprocess("sync", tmp_path / "in", "-c", make_config(tmp_path, sb), "--state", state,
                             "--report", tmp_path / "r", "-q", timeout=60)  # fmt: skip
    finally:
        sock.close()
    assert res.returncode == 0, res.stderr
    assert summary(tmp_path / "r")["input"]["files_skipped"] == 2
    assert sb.lead_by_email("u1@example.com")["didomiNewsletterOptIn"] is True


def test_6_a_fifo_named_on_the_command_line_is_read_like_stdin(sandbox_factory, tmp_path):
    sb = sandbox_factory(leads_file=leads_json(tmp_path, 2))
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    body = gzip.compress(b"".join(
        json.dumps(event(f"u{i}@example.com", "2026-11-01T00:00:00Z", {"newsletter": True})).encode() + b"\n"
        for i in range(2)
    ))  # fmt: skip
    writer = threading.Thread(target=lambda: fifo.write_bytes(body), daemon=True)
    writer.start()
    res = run_subprocess("sync", fifo, "-c", make_config(tmp_path, sb), "--state", tmp_path / "s.db", "-q",
                         timeout=60)  # fmt: skip
    writer.join(5)
    assert res.returncode == 0, res.stderr
    assert sb.lead_by_email("u1@example.com")["didomiNewsletterOptIn"] is True


# ---------------------------------------------------------------------------------------------
# 7. Messages that say what happened


def test_7_a_symlink_loop_and_a_socket_are_named_for_what_they_are(tmp_path, cli):
    config = make_config(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        res = cli("sync", tmp_path / "loop", tmp_path / "dangling", tmp_path / "sock", "-c", config,
                  "--dry-run", "-q")  # fmt: skip
    finally:
        sock.close()
    assert res.exit_code == 1
    assert "loop: symbolic link loop" in res.stderr
    assert "dangling: broken symbolic link" in res.stderr
    assert "sock: not a regular file (a socket)" in res.stderr
    assert "no such file" not in res.stderr


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_7_a_tls_verification_failure_is_named_not_cannot_connect(tmp_path, hostile):
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    srv = hostile()
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    config = hostile_config(tmp_path, srv)
    cfg = json.loads(config.read_text())
    cfg["authentication"]["instance"] = f"https://127.0.0.1:{srv.server_address[1]}/rest"
    config.write_text(json.dumps(cfg))
    events(tmp_path, 1)
    res = run_subprocess("sync", tmp_path / "in", "-c", config, "-q", timeout=60)
    assert res.returncode == 3
    assert "TLS certificate verification failed" in res.stderr and "cannot connect" not in res.stderr
    assert "Traceback" not in res.stderr


def test_7_plain_http_gets_a_context_that_trusts_nothing_and_https_the_ca_bundle():
    """Loading the CA bundle is on the way to the first call; plain http (loopback only) does
    without it, and the context it gets instead would refuse any certificate."""
    import ssl

    from didomi_marketo.marketo.client import _verify

    plain, tls = _verify("http://127.0.0.1:8787"), _verify("https://123-ABC-456.mktorest.com")
    assert plain.cert_store_stats()["x509_ca"] == 0
    assert plain.verify_mode == ssl.CERT_REQUIRED and plain.check_hostname
    assert tls.cert_store_stats()["x509_ca"] > 0 and tls.verify_mode == ssl.CERT_REQUIRED


# ---------------------------------------------------------------------------------------------
# 8. A YAML alias bomb


def test_8_a_yaml_alias_bomb_is_a_config_error(tmp_path, cli):
    bomb = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb.append(
            f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]"
        )
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(bomb) + "\ntype_id: marketo\nmappings: *i\n")
    assert len(path.read_bytes()) < 700
    tracemalloc.start()
    try:
        res = cli("sync", events(tmp_path, 1), "-c", path, "--dry-run")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.exit_code == 2 and "alias" in res.stderr and f"{path}:" in res.stderr
    assert peak < 50 * 2**20


# ---------------------------------------------------------------------------------------------
# 9. Long lines, and a broken first line


def test_9_a_line_over_the_limit_is_rejected_and_reading_streams_on(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=leads_json(tmp_path, 2))
    good = [
        json.dumps(event(f"u{i}@example.com", "2026-11-01T00:00:00Z", {"newsletter": True})) for i in range(2)
    ]
    body = good[0] + "\n" + '{"pad": "' + "x" * 3_000_000 + '"}\n' + good[1] + "\n"
    path = tmp_path / "in" / "big.ndjson.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(body.encode()))
    res = cli("sync", path, "-c", make_config(tmp_path, sb), "--max-line-bytes", 1_000_000, "-q")
    assert res.exit_code == 1
    assert f"{path}:2: line longer than 1,000,000 bytes" in res.stderr
    assert sb.lead_by_email("u1@example.com")["didomiNewsletterOptIn"] is True


def _peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_9_memory_stays_bounded_for_one_huge_gzip_line_and_a_broken_first_line(tmp_path):
    # A gzip that inflates to one 64 MB line, read with a 1 MB limit.
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(b'{"a": "')
        for _ in range(64):
            f.write(b"x" * 2**20)
        f.write(b'"}\n{"ok": 1}\n')
    got, peak = _peak(lambda: list(read_records(InputFile(bomb, str(bomb)), max_line_bytes=2**20)))
    assert [type(g).__name__ for g in got] == ["Problem", "tuple"] and got[1][1] == 2
    assert peak < 8 * 2**20
    # NDJSON of 40 MB whose first line is broken: streamed line by line, not loaded whole.
    broken = tmp_path / "broken.ndjson"
    line = json.dumps(event("u@example.com", "2026-11-01T00:00:00Z", {"newsletter": True})).encode() + b"\n"
    with open(broken, "wb") as f:
        f.write(b'{"user": {"broken"\n')
        for _ in range(40 * 2**20 // len(line)):
            f.write(line)

    def count() -> tuple[int, int]:
        n = problems = 0
        for rec in read_records(InputFile(broken, str(broken))):
            n += 1
            problems += isinstance(rec, Problem)
        return n, problems

    (n, problems), peak = _peak(count)
    assert problems == 1 and n > 100_000
    assert peak < 8 * 2**20


# ---------------------------------------------------------------------------------------------
# 10, 11, 12, 15: a misbehaving Marketo


def test_10_a_response_that_inflates_past_the_cap_is_a_transient_failure(tmp_path, hostile, cli):
    bomb = gzip.compress(b'{"success": true, "result": [' + b" " * (256 * 2**20) + b"]}", 9)

    def inflating(handler: _Handler, body: bytes) -> None:
        handler.reply(200, bomb, {"Content-Encoding": "gzip"})

    srv = hostile(rest__v1__leads_json=inflating)
    events(tmp_path, 3)
    res, peak = _peak(lambda: cli("sync", tmp_path / "in", "-c", hostile_config(tmp_path, srv),
                                  "--skip-schema-check", "--report", tmp_path / "r", "-q"))  # fmt: skip
    assert res.exit_code == 1, res.stderr
    lost = lines(tmp_path / "r" / "undelivered.ndjson")
    assert len(lost) == 3 and all(u["retryable"] and u["code"] == "too_large" for u in lost)
    assert peak < 100 * 2**20  # 256 MB once took 1.85 GB


@pytest.mark.timeout(60)
def test_11_a_server_dripping_a_byte_a_second_meets_a_total_deadline(tmp_path, hostile, cli):
    stop = threading.Event()

    def drip(handler: _Handler, body: bytes) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        for _ in range(1000):  # 1,000 s at a byte a second, were it not for the deadline
            if stop.wait(0.5):
                return
            try:
                handler.wfile.write(b" ")
                handler.wfile.flush()
            except OSError:
                return

    srv = hostile(rest__v1__leads_json=drip)
    events(tmp_path, 2)
    try:
        res = cli("sync", tmp_path / "in", "-c", hostile_config(tmp_path, srv, timeout=1), "--skip-schema-check",
                  "--report", tmp_path / "r", "-q")  # fmt: skip
    finally:
        stop.set()
    assert res.exit_code == 1
    lost = lines(tmp_path / "r" / "undelivered.ndjson")
    assert all(u["code"] == "timeout" and "no complete answer within 1 s" in u["reason"] for u in lost)


def test_12_tokens_and_secrets_echoed_by_the_server_are_redacted_everywhere(tmp_path, hostile, cli):
    calls = {"n": 0}

    def echo(handler: _Handler, body: bytes) -> None:
        calls["n"] += 1
        echoed = f"{handler.command} {handler.path} {handler.headers.get('Authorization')} secret={SECRET}"
        inputs = json.loads(body)["input"]
        if calls["n"] == 1:
            doc = {"success": False, "errors": [{"code": "611", "message": echoed}]}
        else:
            doc = {"success": True, "result": [
                {"status": "skipped", "reasons": [{"code": "1006", "message": echoed}]} for _ in inputs
            ]}  # fmt: skip
        handler.reply(200, json.dumps(doc).encode())

    def usage_echo(handler: _Handler, body: bytes) -> None:
        handler.reply(200, json.dumps({"success": False, "errors": [
            {"code": "603", "message": f"denied for {handler.headers.get('Authorization')}"}]}).encode())  # fmt: skip

    srv = hostile(rest__v1__leads_json=echo, rest__v1__stats__usage_json=usage_echo)
    events(tmp_path, 3)
    state = tmp_path / "s.db"
    res = cli("sync", tmp_path / "in", "-c", hostile_config(tmp_path, srv), "--skip-schema-check", "--state",
              state, "--report", tmp_path / "r", "--log-format", "json")  # fmt: skip
    assert calls["n"] == 2
    written = res.stdout + res.stderr
    written += "".join(p.read_text() for p in (tmp_path / "r").iterdir())
    db = sqlite3.connect(state)
    written += repr(db.execute("SELECT * FROM leads").fetchall())
    db.close()
    assert "1006" in written  # the reasons are there...
    for secret in (TOKEN, SECRET, "s3cret%2B%2Fwith%3Dodd%26chars"):
        assert secret not in written  # ...without the token or the secret


# ---------------------------------------------------------------------------------------------
# 13. Credentials in URLs


def test_13_the_identity_url_never_shows_and_a_user_password_in_the_instance_is_never_printed(
    tmp_path, hostile, cli
):
    def refuse(handler: _Handler, body: bytes) -> None:
        handler.reply(502, f"bad gateway for {handler.path}".encode(), {"Content-Type": "text/plain"})

    srv = hostile(identity__oauth__token=refuse)
    events(tmp_path, 1)
    res = cli("sync", tmp_path / "in", "-c", hostile_config(tmp_path, srv), "--report", tmp_path / "r", "-q")
    assert res.exit_code == 3 and "/identity/oauth/token answered 502" in res.stderr
    assert "client_secret" not in res.stderr and "s3cret" not in res.stderr
    # Adobe documents the credentials as query parameters only: they are sent there, nowhere else.
    method, target, _, body = srv.seen[0]
    assert method == "GET" and "client_secret=" in target and body == b""
    cfg = json.loads(hostile_config(tmp_path, srv).read_text())
    cfg["authentication"]["instance"] = "https://admin:hunter2secret@123-ABC-456.mktorest.com/rest"
    path = tmp_path / "pw.json"
    path.write_text(json.dumps(cfg))
    res = cli(
        "sync", tmp_path / "in", "-c", path, "--dry-run", "--report", tmp_path / "r2", "--log-format", "json"
    )
    assert res.exit_code == 2 and "hunter2secret" not in res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# 14. Config errors are config errors


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"delivery": {"max_concurrency": 2.5}}, "delivery.max_concurrency: must be a whole number"),
        ({"delivery": {"batch_size": "300"}}, "delivery.batch_size: must be a whole number"),
        ({"authentication": {"instance": "https://\u2603.com/rest"}}, "not a valid host name"),
        ({"authentication": {"instance": "https://host:99999/rest"}}, "is not a Marketo REST endpoint"),
    ],
)
def test_14_bad_numbers_and_hosts_are_config_errors_with_file_and_line(tmp_path, cli, change, words):
    config = make_config(tmp_path, **change)
    res = cli("sync", events(tmp_path, 1), "-c", config, "--dry-run")
    assert res.exit_code == 2, res.stderr
    assert words in res.stderr and f"{config}:" in res.stderr and "Traceback" not in res.stderr


def test_14_unreadable_configs_are_config_errors_and_a_fifo_never_hangs(tmp_path, cli):
    data = events(tmp_path, 1)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"type_id: marketo\nmappings:\n  - id: caf\xe9\n")
    deep = tmp_path / "deep.json"
    deep.write_text('{"mappings": ' + "[" * 5000 + "]" * 5000 + "}")
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("mappings: " + "[" * 5000 + "]" * 5000 + "\n")
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    expected = {
        latin: "latin.yaml:3: not UTF-8",
        deep: "deep.json",
        deep_yaml: "deep.yaml",
        fifo: "config.fifo",
    }
    for path, words in expected.items():
        res = cli("sync", data, "-c", path, "--dry-run")
        assert res.exit_code == 2, (path, res.stderr)
        assert words in res.stderr and "Traceback" not in res.stderr


def test_14_a_config_through_process_substitution_is_read(tmp_path):
    config = make_config(tmp_path)
    res = subprocess.run(
        ["bash", "-c", f'"$0" -m didomi_marketo sync "{events(tmp_path, 1)}" -c <(sleep 0.3; cat "{config}") '
         "--dry-run -q", os.environ.get("PYTHON", __import__("sys").executable)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------
# 15. An unexpected usage.json


def test_15_an_unexpected_usage_answer_is_a_warning_not_a_crash(tmp_path, hostile, cli):
    def odd_usage(handler: _Handler, body: bytes) -> None:
        handler.reply(200, b'{"success": true, "result": ["not an object"]}')

    srv = hostile(rest__v1__stats__usage_json=odd_usage)
    events(tmp_path, 50)
    # 50 calls reach 1% of a 5,000-call quota: the size from which a run reads today's usage.
    res = cli("sync", tmp_path / "in", "-c", hostile_config(tmp_path, srv, batch_size=1), "--skip-schema-check",
              "--daily-quota", "5000", "--report", tmp_path / "r", "-q")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert "warning: cannot read today's API usage" in res.stderr
    assert summary(tmp_path / "r")["delivery"]["updated"] == 50


# ---------------------------------------------------------------------------------------------
# 16. The lock is the state's, however it is reached


def test_16_the_same_state_through_a_symlink_is_locked_too(sandbox, tmp_path, cli):
    real = tmp_path / "state.db"
    link = tmp_path / "link.db"
    link.symlink_to(real)
    lock = StateLock(real)
    lock.acquire()
    try:
        res = cli("sync", events(tmp_path, 1), "-c", make_config(tmp_path, sandbox), "--state", link, "-q")
    finally:
        lock.release()
    assert res.exit_code == 4 and "another run holds the state lock" in res.stderr
    assert sandbox.stats()["sync_calls"] == 0


# ---------------------------------------------------------------------------------------------
# 1. A full disk loses nothing


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("mounting a tmpfs needs root (the injected-error tests below cover the same paths)")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def durable(cli: Any, state: Path) -> int:
    """Leads with a durable outcome in the state: confirmed by Marketo, or pending a resend."""
    leads = [json.loads(x) for x in cli("state", "export", "--state", state).stdout.splitlines()]
    return sum(1 for lead in leads if lead["confirmed"] or lead["pending"])


def all_delivered(sb: Any, n: int) -> bool:
    return all(
        (sb.lead_by_email(f"u{i}@example.com") or {}).get("didomiNewsletterOptIn") is True for i in range(n)
    )


N_FULL = 2000


def test_1_a_full_report_volume_loses_no_lead(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=leads_json(tmp_path, N_FULL))
    events(tmp_path, N_FULL)
    config = make_config(tmp_path, sb, delivery={"batch_size": 100, "max_concurrency": 2})
    state, rep = tmp_path / "state.db", tmp_path / "rep"
    with tmpfs(rep, "48k"):
        res = cli("sync", tmp_path / "in", "-c", config, "--state", state, "--report", rep, "-q")
        assert res.exit_code == 3 and "No space left on device" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert durable(cli, state) == N_FULL  # every lead has a durable outcome
    res = cli("sync", tmp_path / "in", "-c", config, "--state", state, "-q")  # the next cron run
    assert res.exit_code == 0, res.stderr
    assert all_delivered(sb, N_FULL)


def test_1_a_full_state_volume_loses_no_lead(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=leads_json(tmp_path, N_FULL))
    events(tmp_path, N_FULL)
    config = make_config(tmp_path, sb, delivery={"batch_size": 100, "max_concurrency": 2})
    vol = tmp_path / "vol"
    state = vol / "state.db"
    with tmpfs(vol, "1m"):
        first = write_ndjson(tmp_path / "first.ndjson", [event("u0@example.com", "2026-10-01T00:00:00Z",
                                                               {"newsletter": True})])  # fmt: skip
        assert cli("sync", first, "-c", config, "--state", state, "-q").exit_code == 0
        filler = vol / "filler"
        with open(filler, "wb") as f:  # leave about 100 KB: the state fills mid-run
            free = os.statvfs(vol).f_bavail * os.statvfs(vol).f_frsize
            f.write(b"\0" * max(0, free - 100 * 1024))
        res = cli("sync", tmp_path / "in", "-c", config, "--state", state, "--report", tmp_path / "r", "-q")
        assert res.exit_code == 3, res.stderr
        assert "full" in res.stderr and "cannot rollback" not in res.stderr and "Traceback" not in res.stderr
        filler.unlink()
        res = cli("sync", tmp_path / "in", "-c", config, "--state", state, "-q")  # space again: rerun
        assert res.exit_code == 0, res.stderr
    assert all_delivered(sb, N_FULL)


class _Failing:
    """Make `batch_done` of a sink class fail from its `after`-th batch on, like a disk that fills."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type, after: int, error: Exception):
        self.calls = 0
        original = cls.batch_done

        def batch_done(sink: Any, outcomes: Any) -> None:
            self.calls += 1
            if self.calls > after:
                raise error
            original(sink, outcomes)

        monkeypatch.setattr(cls, "batch_done", batch_done)


def test_1_injected_full_disk_in_the_state_or_the_report_loses_no_lead(
    sandbox_factory, tmp_path, cli, monkeypatch
):
    from didomi_marketo.report import Report
    from didomi_marketo.state import StateStore

    sb = sandbox_factory(leads_file=leads_json(tmp_path, 600))
    events(tmp_path, 600)
    config = make_config(tmp_path, sb, delivery={"batch_size": 50, "max_concurrency": 1})
    state = tmp_path / "state.db"
    with monkeypatch.context() as m:
        _Failing(m, Report, 3, OSError(28, "No space left on device"))
        res = cli("sync", tmp_path / "in", "-c", config, "--state", state, "--report", tmp_path / "r", "-q")
    assert res.exit_code == 3 and "No space left on device" in res.stderr
    assert durable(cli, state) == 600  # the report failed, the state has every outcome
    with monkeypatch.context() as m:
        _Failing(m, StateStore, 2, sqlite3.OperationalError("database or disk is full"))
        events(tmp_path, 600, "in/later.ndjson")  # a new input, half of it never recorded
        res = cli("sync", tmp_path / "in", "-c", config, "--state", state, "--full", "-q")
    assert res.exit_code == 3 and "database or disk is full" in res.stderr
    counts = json.loads(cli("state", "show", "--state", state).stdout)
    assert counts["inputs"] == 1  # the run whose outcomes were lost recorded no input as synced
    res = cli("sync", tmp_path / "in", "-c", config, "--state", state, "-q")
    assert res.exit_code == 0, res.stderr
    assert all_delivered(sb, 600)


# ---------------------------------------------------------------------------------------------
# 2. retry without a state


def test_2_retry_without_a_state_refuses_instead_of_rolling_consent_back(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=leads_json(tmp_path, 1))
    config = make_config(tmp_path, sb, **QUICK)
    state = tmp_path / "state.db"
    yes = write_ndjson(
        tmp_path / "yes.ndjson", [event("u0@example.com", "2026-11-01T00:00:00Z", {"newsletter": True})]
    )
    no = write_ndjson(
        tmp_path / "no.ndjson", [event("u0@example.com", "2026-11-02T00:00:00Z", {"newsletter": False})]
    )
    sb.inject("http:503", times=2)  # the opt-in fails retryably...
    assert cli("sync", yes, "-c", config, "--state", state, "--report", tmp_path / "r1", "-q").exit_code == 1
    res = cli("sync", no, "-c", config, "--state", state, "--report", tmp_path / "r2", "-q")
    assert res.exit_code == 0  # ...the revocation lands
    calls = sb.stats()["sync_calls"]
    res = cli("retry", tmp_path / "r1", "-c", config, "-q")
    assert res.exit_code == 2 and "--state" in res.stderr and "--force" in res.stderr
    assert (
        sb.stats()["sync_calls"] == calls
        and sb.lead_by_email("u0@example.com")["didomiNewsletterOptIn"] is False
    )
    res = cli("retry", tmp_path / "r1", "-c", config, "--state", state, "-q")
    assert res.exit_code == 0 and sb.lead_by_email("u0@example.com")["didomiNewsletterOptIn"] is False
    res = cli(
        "retry", tmp_path / "r1", "-c", config, "--newer", tmp_path / "r2", "--report", tmp_path / "r3", "-q"
    )
    assert res.exit_code == 0 and summary(tmp_path / "r3")["leads"]["to_send"] == 0  # the newer report wins
    assert sb.lead_by_email("u0@example.com")["didomiNewsletterOptIn"] is False
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    examples = [line for line in readme.splitlines() if "didomi-marketo retry " in line]
    assert examples and all("--state" in line for line in examples)


# ---------------------------------------------------------------------------------------------
# 17. A run that fails before delivery still writes its summary


def test_17_a_run_failing_before_delivery_writes_summary_json_with_the_reason(sandbox, tmp_path, cli):
    data = events(tmp_path, 1)
    config = make_config(tmp_path, sandbox)
    cfg = json.loads(config.read_text())
    cfg["authentication"]["client_secret"] = "wrong-secret"
    config.write_text(json.dumps(cfg))
    res = cli("sync", data, "-c", config, "--report", tmp_path / "r", "-q")
    assert res.exit_code == 3
    s = summary(tmp_path / "r")
    assert s["exit_code"] == 3 and "refused the client credentials" in s["error"] and s["mode"] == "sync"
    lock = StateLock(tmp_path / "s.db")
    lock.acquire()
    try:
        res = cli("sync", data, "-c", make_config(tmp_path, sandbox), "--state", tmp_path / "s.db",
                  "--report", tmp_path / "r2", "-q")  # fmt: skip
    finally:
        lock.release()
    assert res.exit_code == 4 and summary(tmp_path / "r2")["exit_code"] == 4
    assert "state lock" in summary(tmp_path / "r2")["error"]
