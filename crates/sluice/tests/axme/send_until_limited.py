# send_until_limited.py: from the AXME cost-policy README; the only change is base_url.
from axme import AxmeClient, AxmeClientConfig
import os

client = AxmeClient(AxmeClientConfig(api_key=os.environ["AXME_API_KEY"], base_url=os.environ["AXME_BASE_URL"]))

for i in range(250):
    try:
        intent_id = client.send_intent({
            "intent_type": "intent.orders.process.v1",
            "to_agent": "agent://myorg/production/order-processor",
            "payload": {"order_id": f"ORD-{i:04d}"},
        })
        print(f"[{i}] Sent: {intent_id}")
    except Exception as e:
        print(f"[{i}] Blocked: {e}")
        # Agent hit the rate limit - this is expected after 200 intents
        break
