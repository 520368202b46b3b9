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
    out["request_id"] = r._request_id
    stream = client.chat.completions.create(model="gpt-test", messages=messages, max_tokens=100, stream=True)
    out["streamed"] = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    out["models"] = [m.id for m in client.models.list()]
elif sys.argv[1] == "routes":
    c = client.completions.create(model="gpt-test", prompt="Say hello.", max_tokens=100)
    out["completion"] = c.choices[0].text
    out["completion_usage"] = [c.usage.prompt_tokens, c.usage.completion_tokens]
    out["completion_streamed"] = "".join(
        ch.choices[0].text for ch in client.completions.create(model="gpt-test", prompt="Say hello.", max_tokens=100, stream=True) if ch.choices
    )
    e = client.embeddings.create(model="gpt-test", input=["one", "two"])
    out["embeddings"] = [list(d.embedding) for d in e.data]
    out["embedding_usage"] = e.usage.prompt_tokens
    r = client.responses.create(model="gpt-test", input="Say hello.", max_output_tokens=100)
    out["response"] = r.output_text
    out["response_usage"] = [r.usage.input_tokens, r.usage.output_tokens]
    streamed = ""
    with client.responses.stream(model="gpt-test", input="Say hello.", max_output_tokens=100) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                streamed += event.delta
        final = stream.get_final_response()
    out["response_streamed"] = streamed
    out["response_streamed_usage"] = [final.usage.input_tokens, final.usage.output_tokens]
else:
    try:
        client.chat.completions.create(model="gpt-test", messages=messages, max_tokens=100)
        out["raised"] = None
    except openai.RateLimitError as e:
        out["raised"] = type(e).__name__
        out["status"] = e.status_code
        out["code"] = e.code
print(json.dumps(out))
