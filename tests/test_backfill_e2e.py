"""The backfill issue #13 asks to show: a generated export of 200,000 users in moto's S3, synced
into the sandbox by bulk import, every lead ending right and the report accounting for every
lead; the same export through GCS and Sync Leads ends with the same leads."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

from conftest import make_config
from emulators import upload_tree
from test_bulk_e2e import FAST_POLLS, MAPPINGS, final_leads, lines, users

ENV = {"MARKETO_CLIENT_ID": "sandbox-client", "MARKETO_CLIENT_SECRET": "sandbox-secret"}
USERS = 200_000


def export(root: Path, n: int, parts: int = 4) -> Path:
    """A complete Didomi batch-export partition of `n` users (batch-export lines, gzipped)."""
    folder = root / "export-id=e1" / "date=2026-11-20"
    (folder / "users").mkdir(parents=True)
    everyone = users(n, key=lambda i: f"user{i:06}@example.com")
    per = -(-n // parts)
    for p in range(parts):
        text = "".join(
            json.dumps({"user": u, "events": []}) + "\n" for u in everyone[p * per : (p + 1) * per]
        )
        (folder / "users" / f"part-{p:05}.json.gz").write_bytes(gzip.compress(text.encode(), 1))
    (folder / "_SUCCESS").write_bytes(b"")
    return root


def test_200000_users_from_s3_by_bulk_end_as_from_gcs_by_sync_leads(s3, gcs, sandbox_factory, tmp_path, cli):
    local = export(tmp_path / "export", USERS)
    urls = {}
    for name, store, scheme in (("s3", s3, "s3"), ("gcs", gcs, "gs")):
        bucket = "b-" + uuid.uuid4().hex[:12]
        store.create_bucket(bucket)
        assert upload_tree(store, local, f"{scheme}://{bucket}/didomi") == 5  # 4 parts + _SUCCESS
        urls[name] = f"{scheme}://{bucket}/didomi"

    existing = [{"email": f"user{i:06}@example.com", "firstName": f"F{i}"} for i in range(0, USERS, 7)]
    ends = {}
    for name, via in (("s3", "bulk"), ("gcs", "rest")):
        # Sync Leads at a compressed rate window (100 calls a second), so 667 calls take seconds.
        sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=0, rate_window=1.0)
        sb.seed_leads(existing)
        store = s3 if name == "s3" else gcs
        cfg = make_config(tmp_path, sb, mappings=MAPPINGS[:3], upsert_mode=True, delivery=FAST_POLLS)
        rep = tmp_path / name
        result = cli("sync", urls[name], "-c", cfg, "--via", via, "--rate-window", "1", "--report", rep, "-q",
                     env={**ENV, **store.env()})  # fmt: skip
        assert result.exit_code == 0, result.output + result.stderr
        summary = json.loads((rep / "summary.json").read_text())
        d = summary["delivery"]
        assert d["path"] == via and summary["leads"]["to_send"] == USERS
        assert d["created"] + d["updated"] + d["imported"] == USERS and d["failed"] == 0
        # The report accounts for every lead, once.
        delivered = [x["key"] for x in lines(rep / "delivered.ndjson")]
        assert len(delivered) == len(set(delivered)) == USERS and not lines(rep / "undelivered.ndjson")
        ends[name] = (final_leads(sb), sb.stats(), d)

    assert ends["s3"][0] == ends["gcs"][0]  # the same leads, field by field
    leads = ends["s3"][0]
    assert len(leads) == USERS and leads["user000007@example.com"]["firstName"] == "F7"
    assert leads["user000003@example.com"]["didomiTopics"] == "news,events"
    # Bulk: one upload per set of fields to send (4 sets, each file far under 10 MB), against
    # ceil(200,000 / 300) Sync Leads calls.
    assert ends["s3"][1]["bulk_uploads"] == 4 and ends["s3"][1]["sync_calls"] == 0
    assert ends["gcs"][1]["sync_calls"] == 667
