"""Schemathesis hooks for the payments demo (loaded by tests/openapi.rs through SCHEMATHESIS_HOOKS).

PAYMENTS_KEYS chooses the run:

- "generated": every request carries the Idempotency-Key that schemathesis generates from the
  header's schema. Keys repeat across requests, so replays (Idempotent-Replayed: true) and key
  reuse with another request (422) are exercised too.
- "absent": the Idempotency-Key header is removed from every request before it is sent, so every
  protected operation must refuse it (400 key-missing, or an earlier 4xx) and none may succeed.

Two kinds of answer are right for the demo although a schema cannot say so; only these failures
are dropped, everything else fails the run:

- a schema-valid request answered 422 `urn:idempotent:problem:key-reused` (its key was used before
  with another request: a schema describes one request, not the history of a key), or 422
  `urn:payments-demo:problem:refund-exceeds-payment` (what is left to refund depends on earlier
  refunds);
- "invalid credentials" accepted: the demo's bearer token is the account name itself, so the probe
  credential schemathesis sends (`Bearer SCHEMATHESIS-INVALID-VALUE`) is simply another account.
  Requests without credentials must still be refused with 401.

Each dropped failure is written to the file PAYMENTS_DROPPED names, and the test prints them
counted. The custom check `protected_operations_need_a_key` fails the "absent" run if any
protected operation succeeds without a key.
"""

import os

import schemathesis

KEY_HEADER = "idempotency-key"
MODE = os.environ.get("PAYMENTS_KEYS", "generated")
STATEFUL_PROBLEMS = {
    "urn:idempotent:problem:key-reused",
    "urn:payments-demo:problem:refund-exceeds-payment",
}


def _takes_key(operation):
    return any(
        parameter.location.name == "HEADER" and parameter.name.lower() == KEY_HEADER
        for parameter in operation.iter_parameters()
    )


@schemathesis.hook
def before_call(context, case, kwargs):
    if MODE == "absent" and case.headers:
        for name in [name for name in case.headers if name.lower() == KEY_HEADER]:
            del case.headers[name]


@schemathesis.check
def protected_operations_need_a_key(ctx, response, case):
    """Without the key header, no protected operation may run."""
    if MODE == "absent" and _takes_key(case.operation) and 200 <= response.status_code < 300:
        raise AssertionError(
            f"{case.operation.label} answered {response.status_code} to a request without an Idempotency-Key"
        )


def _problem_type(response):
    try:
        body = response.json()
    except Exception:
        return None
    return body.get("type") if isinstance(body, dict) else None


def _dropped(failure, why):
    """Records a dropped failure in PAYMENTS_DROPPED (one line each), for the test to count."""
    path = os.environ.get("PAYMENTS_DROPPED")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"{failure.code} {why}\n")
    return False


@schemathesis.hook
def filter_failure(context, failure, case, response):
    if failure.code == "ST202" and response is not None and response.status_code == 422:
        problem = _problem_type(response)
        if problem in STATEFUL_PROBLEMS:
            return _dropped(failure, f"422 {problem}")
    if failure.code == "ST401" and str(getattr(failure, "scenario", "")) == "invalid_auth":
        return _dropped(failure, "invalid credentials accepted: Bearer SCHEMATHESIS-INVALID-VALUE is an account")
    return True
