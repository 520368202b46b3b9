# The official OpenAI SDK against Sluice: only base_url and api_key change.
import json
import os
import sys

import openai

client = openai.OpenAI(base_url=os.environ["SLUICE_URL"] + "/v1", api_key=os.environ["SLUICE_KEY"], max_retries=0)
messages = [{"role": "user", "content": "Say hello."}]
out = {}
if sys.argv[1] == "ok":
    r = client.chat.completions.create(model="gpt-test", messages=messages, max_tokens=100)
    out["content"] = r.choices[0].message.content
    out["usage"] = {"prompt": r.usage.prompt_tokens, "completion": r.usage.completion_tokens}
    stream = client.chat.completions.create(model="gpt-test", messages=messages, max_tokens=100, stream=True)
    out["streamed"] = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    out["models"] = [m.id for m in client.models.list()]
else:
    try:
        client.chat.completions.create(model="gpt-test", messages=messages, max_tokens=100)
        out["raised"] = None
    except openai.RateLimitError as e:
        out["raised"] = type(e).__name__
        out["status"] = e.status_code
        out["code"] = e.code
print(json.dumps(out))
