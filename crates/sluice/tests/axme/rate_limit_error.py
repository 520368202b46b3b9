# One more intent through the official SDK: it must raise AxmeRateLimitError
# with an integer retry_after taken from Retry-After. Prints the facts as JSON.
import json
import os

from axme import AxmeClient, AxmeClientConfig, AxmeRateLimitError

client = AxmeClient(AxmeClientConfig(api_key=os.environ["AXME_API_KEY"], base_url=os.environ["AXME_BASE_URL"]))
try:
    client.send_intent({
        "intent_type": "intent.orders.process.v1",
        "to_agent": "agent://myorg/production/order-processor",
        "payload": {"order_id": "ORD-9999"},
    }, idempotency_key=None)
    print(json.dumps({"raised": None}))
except AxmeRateLimitError as e:
    print(json.dumps({
        "raised": type(e).__name__,
        "status": e.status_code,
        "retry_after": e.retry_after,
        "retry_after_is_int": isinstance(e.retry_after, int),
        "message": e.message,
    }))
except Exception as e:  # noqa: BLE001 - report what was raised instead
    print(json.dumps({"raised": type(e).__name__, "message": str(e)}))
