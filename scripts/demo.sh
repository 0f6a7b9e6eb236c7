#!/usr/bin/env bash
# The demo: a local Marketo sandbox seeded with sample_exports/leads.json, then a real sync of
# sample_exports/didomi/ into it over HTTP, then the leads as the sandbox holds them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=8787
export MARKETO_CLIENT_ID=sandbox-client MARKETO_CLIENT_SECRET=sandbox-secret

$BIN/didomi-marketo sandbox --port "$PORT" --leads sample_exports/leads.json > /tmp/didomi-marketo-demo-sandbox.log 2>&1 &
SANDBOX=$!
trap 'kill $SANDBOX 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  grep -q "listening" /tmp/didomi-marketo-demo-sandbox.log 2>/dev/null && break
  sleep 0.1
done
cat /tmp/didomi-marketo-demo-sandbox.log

echo
echo "== 1. dry run: what would be sent (no credentials, no network) =="
$BIN/didomi-marketo sync sample_exports/didomi --config sample_exports/config/marketo.json --dry-run || true

echo
echo "== 2. sync into the sandbox (bad-records.ndjson is rejected on purpose: exit code 1) =="
set +e
$BIN/didomi-marketo sync sample_exports/didomi --config sample_exports/config/marketo.json --report demo-report
echo "exit code: $?"
set -e

echo
echo "== 3. leads in the sandbox now (a few) =="
$BIN/python - "$PORT" <<'PY'
import json, sys, urllib.request
leads = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/_sandbox/leads"))
cols = ["email", "didomiNewsletterOptIn", "didomiAnalyticsOptIn", "didomiTopics", "didomiCountry"]
print("  ".join(f"{c:<24}" for c in cols))
for lead in sorted(leads, key=lambda l: l["email"])[:8]:
    print("  ".join(f"{str(lead.get(c, '')):<24}" for c in cols))
print(f"... {len(leads)} leads in all")
PY

echo
echo "== 4. the report: demo-report/ =="
ls demo-report
echo "what happened to zoe@example.com?"
grep -h zoe@example.com demo-report/*.ndjson | cut -c1-200
