# check_usage.py: verbatim from the AXME cost-policy README; it reads AXME_BASE_URL.
import httpx
import os

api_key = os.environ["AXME_API_KEY"]
base_url = os.environ.get("AXME_BASE_URL", "https://cloud.axme.ai")
headers = {"x-api-key": api_key}

agent_address = "agent://myorg/production/order-processor"

response = httpx.get(
    f"{base_url}/v1/mesh/agents/{agent_address}/policies/cost",
    headers=headers,
)
policy = response.json()
print(f"Policy: {policy}")
