# The kill switch through the official SDK's mesh API: mesh.kill stops an
# agent at once (intents to it and the decision API for its own key answer
# 403), mesh.list_agents and mesh.list_events show it, mesh.resume restores
# it. Prints the facts as JSON.
import json
import os

import httpx
from axme import AxmeAuthError, AxmeClient, AxmeClientConfig

base = os.environ["AXME_BASE_URL"]
client = AxmeClient(AxmeClientConfig(api_key=os.environ["AXME_API_KEY"], base_url=base))
address = "agent://myorg/production/runaway"
admin = {"authorization": "Bearer " + os.environ["AXME_API_KEY"]}
agent_key = httpx.post(base + "/v1/keys", headers=admin, json={"subject": address}).json()["key"]
intent = {"intent_type": "intent.orders.process.v1", "to_agent": address, "payload": {}}


def send():
    try:
        client.send_intent(intent, idempotency_key=None)
        return "sent"
    except AxmeAuthError as e:
        return e.status_code


def check():
    r = httpx.post(
        base + "/v1/check",
        headers={"authorization": "Bearer " + agent_key},
        json={"subjects": [address]},
    )
    return r.status_code


facts = {"before": [send(), check()]}
facts["kill"] = client.mesh.kill(address)
facts["killed"] = [send(), check()]
facts["agents"] = client.mesh.list_agents()
facts["events"] = client.mesh.list_events()
facts["resume"] = client.mesh.resume(address)
facts["after"] = [send(), check()]
print(json.dumps(facts))
