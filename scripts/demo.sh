#!/usr/bin/env bash
# The demo: a local Marketo sandbox seeded with sample_exports/leads.json, then a real sync of
# sample_exports/didomi/ into it over HTTP, then the leads as the sandbox holds them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${DEMO_PORT:-8787}
free() { $BIN/python -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null; }
if ! free "$PORT"; then
  # Taken (another demo, another service): any free port; the config's instance is overridden
  # by MARKETO_INSTANCE below (the environment beats the file).
  PORT=$($BIN/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  echo "port ${DEMO_PORT:-8787} is taken: the demo's sandbox listens on $PORT instead"
fi
export MARKETO_CLIENT_ID=sandbox-client MARKETO_CLIENT_SECRET=sandbox-secret
export MARKETO_INSTANCE="http://127.0.0.1:$PORT/rest"

SANDBOX_LOG=$(mktemp)
$BIN/didomi-marketo sandbox --port "$PORT" --leads sample_exports/leads.json > "$SANDBOX_LOG" 2>&1 &
SANDBOX=$!
trap 'kill $SANDBOX 2>/dev/null || true; rm -f "$SANDBOX_LOG"' EXIT
for _ in $(seq 300); do  # up to 30 s: a loaded machine starts Python slowly
  grep -q "listening" "$SANDBOX_LOG" 2>/dev/null && break
  sleep 0.1
done
if ! grep -q "listening" "$SANDBOX_LOG"; then
  echo "demo: the sandbox did not start on 127.0.0.1:$PORT: $(tail -1 "$SANDBOX_LOG")" >&2
  exit 1
fi
cat "$SANDBOX_LOG"

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

echo
echo "== 5. explain: what happened to alice@example.com's consent, and why Marketo says what it says =="
$BIN/didomi-marketo explain alice@example.com sample_exports/didomi --config sample_exports/config/marketo.json --report demo-report

echo
echo "== 6. reconcile: a marketer edits two leads by hand; does Marketo still match what people chose? =="
$BIN/python - "$PORT" <<'PY'
import json, sys, urllib.request
edits = [
    {"email": "alice@example.com", "set": {"didomiNewsletterOptIn": True}},  # she opted out
    {"email": "dave@example.com", "set": {"didomiAnalyticsOptIn": None}},  # blanked
]
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/_sandbox/leads", data=json.dumps(edits).encode(),
                             method="PATCH", headers={"Content-Type": "application/json"})
print("edited behind the tool's back:", json.load(urllib.request.urlopen(req)))
PY
set +e
$BIN/didomi-marketo reconcile sample_exports/didomi --config sample_exports/config/marketo.json --report demo-reconcile 2>/dev/null
echo "exit code: $? (1: drift found; demo-reconcile/drift.ndjson lists it)"
set -e
