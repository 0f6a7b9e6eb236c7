"""Marketo error codes -> what we do about them. One table, kept as data, with the reason for each.

Sources: Adobe's error-codes page and how mature clients (MRP, Segment, RudderStack) treat each
code. Match on codes, never on messages.
"""

from __future__ import annotations

from enum import Enum


class Action(Enum):
    REAUTH = "reauth"  # fetch a new token, then resend the same call
    RETRY = "retry"  # transient: back off (exponential, jittered) and resend
    QUOTA = "quota"  # daily quota: stop sending at once, everything left is retryable tomorrow
    ABORT = "abort"  # the run cannot succeed as configured: stop, exit 3
    SPLIT = "split"  # payload too large: split the batch and resend both halves
    WAIT = "wait"  # bulk import queue full: wait for room and resend, never give up


# The client's own failure kinds (pseudo-codes in reports, beside Marketo's numeric codes).
NETWORK = "network"
TIMEOUT = "timeout"
UNREADABLE = "unreadable"
RESULT_MISMATCH = "result_mismatch"
UNKNOWN_STATUS = "unknown_status"
UNKNOWN_ERROR = "unknown"
AUTH = "auth"
STOPPED = "stopped"
INTERNAL = "internal"
BULK_JOB_FAILED = "bulk_job_failed"
BULK_UNMATCHED = "bulk_unmatched"
BULK_ROW_FAILED = "bulk_failed"
SMALL_BODY_REFUSED = "proxy_413"
TOO_LARGE = "too_large"

# Request-level codes (HTTP status, `errors[].code` with success:false, or the client's own kind).
REQUEST_CODES: dict[str, tuple[Action, str]] = {
    "601": (Action.REAUTH, "access token invalid: fetch a new one and resend"),
    "602": (Action.REAUTH, "access token expired: fetch a new one and resend"),
    "604": (Action.RETRY, "request timed out at Marketo; not executed"),
    "606": (Action.RETRY, "rate limit (100 calls/20 s, shared with other integrations): back off"),
    "608": (Action.RETRY, "API temporarily unavailable"),
    "611": (Action.RETRY, "Marketo system error; clients retry it"),
    # The delivery issue listed 613 as transient, but it says our multipart body is malformed:
    # resending the same body fails the same way for 5 minutes (Adobe, MRP and Segment abort).
    "613": (Action.ABORT, "invalid multipart request (a malformed body: resending cannot help)"),
    "614": (Action.RETRY, "invalid subscription: 'usually temporary' per Adobe"),
    "615": (Action.RETRY, "concurrent access limit (10 in flight, shared): back off"),
    "713": (Action.RETRY, "transient error: wait and retry"),
    "719": (Action.RETRY, "lock wait timeout"),
    "607": (Action.QUOTA, "daily quota reached; resets at 12:00 AM US Central time"),
    "600": (Action.ABORT, "access token not specified (a bug here, never data)"),
    "603": (Action.ABORT, "access denied: the API user's role or IP allowlist"),
    "605": (Action.ABORT, "HTTP method not supported"),
    "609": (Action.ABORT, "invalid JSON"),
    "610": (Action.ABORT, "resource not found: check the instance URL"),
    "612": (Action.ABORT, "invalid content type"),
    "616": (Action.ABORT, "invalid subscription type"),
    # Bulk import: Marketo queues at most 10 jobs per instance, other integrations' included.
    "1016": (Action.WAIT, "too many imports: the bulk queue (10 jobs) is full; wait for room"),
    "1019": (Action.WAIT, "import in progress to the same list; wait for it"),
    # HTTP statuses (not Marketo codes; same table so there is one place to look).
    "http:401": (Action.ABORT, "Marketo refused the client credentials"),
    "http:413": (Action.SPLIT, "request body over 1 MB: split and resend"),
    "http:414": (Action.SPLIT, "request URI over 8 KB"),
    "http:429": (Action.RETRY, "rate limited by a proxy in front of Marketo"),
    # The client's own failure kinds: what went wrong before Marketo could answer with a code.
    NETWORK: (Action.RETRY, "connection refused, reset or dropped: maybe applied, resent"),
    TIMEOUT: (Action.RETRY, "no answer within the timeout: maybe applied, resent"),
    UNREADABLE: (Action.RETRY, "an answer that is not a JSON object (a proxy's error page)"),
    RESULT_MISMATCH: (Action.RETRY, "a `result` of the wrong length: not counted as delivered"),
    UNKNOWN_STATUS: (Action.RETRY, "a lead's result with a status Marketo does not document"),
    UNKNOWN_ERROR: (Action.RETRY, "success:false without a numeric code: transient until proven otherwise"),
    AUTH: (Action.ABORT, "Marketo refused the client credentials at /identity"),
    STOPPED: (Action.ABORT, "not sent: the run stopped first (quota, --max-calls, a signal)"),
    INTERNAL: (Action.ABORT, "an error of ours (a sink that cannot write, a full disk): the run stops"),
    BULK_JOB_FAILED: (Action.RETRY, "a bulk import job ended Failed as a whole: its leads stay retryable"),
    BULK_UNMATCHED: (
        Action.RETRY,
        "a failures/warnings row named no lead: the job's unnamed leads stay retryable",
    ),
    SMALL_BODY_REFUSED: (
        Action.RETRY,
        "HTTP 413 for a body under Marketo's 1 MB: a proxy's limit, not the batch's; resent later",
    ),
    TOO_LARGE: (Action.RETRY, "an answer that inflates past the cap: a broken server or proxy"),
}

# Lead-level codes in `result[i].reasons[]`: never retried within the run (the same payload
# would fail the same way), reported per lead.
RECORD_CODES: dict[str, str] = {
    "1001": "invalid value type for a field",
    "1002": "missing value for a required field",
    "1003": "invalid data (bad value, or id outside updateOnly)",
    "1004": "lead not found (updateOnly: expected when upsert_mode is false)",
    "1005": "lead already exists (createOnly)",
    "1006": "field not found in Marketo",
    "1007": "several leads match the lookup value (duplicates in Marketo)",
    "1008": "access denied to partition",
    "1009": "partition name must be specified",
    "1010": "partition update not allowed",
    "1011": "field not supported as lookup",
    "1021": "company fields cannot be updated through Sync Leads",
    # Bulk import rows carry a reason text and no code; the text is reported as Marketo wrote it.
    BULK_ROW_FAILED: "a bulk import row failed (Marketo's reason is in the report)",
}

LEAD_NOT_FOUND = "1004"
QUOTA_RESET_NOTE = "Marketo's daily quota resets at 12:00 AM US Central time"


def request_action(code: str) -> Action:
    """What to do with a request-level failure. Unknown 5xx and unknown Marketo (numeric) codes
    are transient; any other unknown code is a bug here, not a reason to retry for 5 minutes."""
    if code in REQUEST_CODES:
        return REQUEST_CODES[code][0]
    if code.startswith("http:5"):
        return Action.RETRY  # 500/502/503/504: Adobe says retry 502 with backoff; so do clients
    if code.startswith("http:"):
        return Action.ABORT
    if code.isdigit():
        return Action.RETRY  # a code Adobe added since: transient until proven otherwise
    raise ValueError(f"failure kind {code!r} is not in marketo/codes.py")


def describe(code: str) -> str:
    if code in REQUEST_CODES:
        return REQUEST_CODES[code][1]
    return RECORD_CODES.get(code, "")


def is_expected_skip(code: str, action: str) -> bool:
    """1004 under updateOnly is what upsert_mode false means: the user is not a lead (yet)."""
    return code == LEAD_NOT_FOUND and action == "updateOnly"
