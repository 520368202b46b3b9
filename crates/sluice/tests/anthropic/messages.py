# The official Anthropic SDK against Sluice: only base_url and api_key change.
import json
import os
import sys

import anthropic

client = anthropic.Anthropic(base_url=os.environ["SLUICE_URL"], api_key=os.environ["SLUICE_KEY"], max_retries=0)
messages = [{"role": "user", "content": "Say hello."}]
out = {}
if sys.argv[1] == "ok":
    r = client.messages.create(model="claude-test", max_tokens=100, messages=messages)
    out["content"] = r.content[0].text
    out["request_id"] = r._request_id
    out["usage"] = {"input": r.usage.input_tokens, "output": r.usage.output_tokens}
    with client.messages.stream(model="claude-test", max_tokens=100, messages=messages) as stream:
        out["streamed"] = "".join(stream.text_stream)
elif sys.argv[1] == "count":
    out["input_tokens"] = client.messages.count_tokens(model="claude-test", messages=messages).input_tokens
else:
    try:
        client.messages.create(model="claude-test", max_tokens=100, messages=messages)
        out["raised"] = None
    except anthropic.RateLimitError as e:
        out["raised"] = type(e).__name__
        out["status"] = e.status_code
print(json.dumps(out))
