# set_policy.py: verbatim from the AXME cost-policy README (../shared/seeds); it reads AXME_BASE_URL.
import httpx
import os

api_key = os.environ["AXME_API_KEY"]
base_url = os.environ.get("AXME_BASE_URL", "https://cloud.axme.ai")
headers = {"x-api-key": api_key}

agent_address = "agent://myorg/production/order-processor"

response = httpx.put(
    f"{base_url}/v1/mesh/agents/{agent_address}/policies/cost",
    headers=headers,
    json={
        "max_intents_per_hour": 200,
        "max_intents_per_day": 2000,
        "max_cost_per_day_usd": 10.00,
        "action_on_breach": "block",
    },
)
print(f"Policy set: {response.json()}")
