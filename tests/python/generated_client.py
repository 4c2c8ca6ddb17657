"""Drives the relay's REST API through a client generated from its OpenAPI
document by openapi-python-client (the test generates the package first):
a send, its replay by the same Idempotency-Key, and a 429 met and waited
out by its Retry-After. Usage: generated_client.py PACKAGE_DIR BASE_URL API_KEY
"""

import sys
import time

sys.path.insert(0, sys.argv[1])

from chukei_client import AuthenticatedClient  # noqa: E402
from chukei_client.api.messages import send  # noqa: E402
from chukei_client.api.reports import prices  # noqa: E402
from chukei_client.models import Accepted, Content, Problem, SendBody, TargetType1  # noqa: E402

base_url, api_key = sys.argv[2], sys.argv[3]
client = AuthenticatedClient(base_url=base_url, token=api_key)
met_429 = 0


def with_retry(call):
    """Calls until the answer is not a 429, sleeping each Retry-After."""
    global met_429
    while True:
        response = call()
        if response.status_code != 429:
            return response
        met_429 += 1
        problem = response.parsed
        assert isinstance(problem, Problem), problem
        wait = int(response.headers["retry-after"])
        assert 1 <= wait <= 60, wait
        time.sleep(wait)


body = SendBody(target=TargetType1(all_registered=True), content=Content(text="from a generated client"))
first = with_retry(lambda: send.sync_detailed(client=client, body=body, idempotency_key="generated-1"))
assert first.status_code == 201, (first.status_code, first.content)
assert isinstance(first.parsed, Accepted) and not first.parsed.replayed, first.parsed
again = with_retry(lambda: send.sync_detailed(client=client, body=body, idempotency_key="generated-1"))
assert again.status_code == 200, (again.status_code, again.content)
assert again.headers["idempotent-replayed"] == "true"
assert again.parsed.message_id == first.parsed.message_id and again.parsed.replayed
# Calls at once until the rate limit answers; each 429 is waited out.
for _ in range(20):
    with_retry(lambda: prices.sync_detailed(client=client))
    if met_429:
        break
assert met_429 > 0, "no 429 met in 20 calls at once"
print(f"ok: message {first.parsed.message_id} sent and replayed; {met_429} rate limit(s) waited out")
