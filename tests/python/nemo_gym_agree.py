"""The reward a real NeMo Gym server gives each of a set of answers to its data rows.

    python nemo_gym_agree.py URL ROWS.jsonl

For every row, a few answers, right and wrong, chosen by the row's kind (mcqa, reasoning_gym,
structured_outputs, rows that offer tools). Each answer is made of parts (text, tool calls);
this script builds its Responses output with NeMo Gym's own pydantic types, POSTs it to the
server's /verify in a fresh session, and prints one JSON object:

    {"items": [{"line": N, "what": "...", "completion": "...", "reward": R}, ...]}

where `completion` is the same answer as a Chorus policy writes it (text and
<tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks, in order). tests/nemo_gym_real.rs
scores those completions with `chorus env score` and expects the same rewards.
"""

import json
import sys
import urllib.request
from http.cookiejar import CookieJar

from nemo_gym.openai_utils import (
    NeMoGymResponse,
    NeMoGymResponseFunctionToolCall,
    NeMoGymResponseOutputMessage,
    NeMoGymResponseOutputText,
)


def instance(schema):
    """A value that satisfies a (simple) JSON schema."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return instance(schema[key][0])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: instance(sub) for name, sub in props.items()}
    if kind == "array":
        return [instance(schema.get("items", {"type": "string"}))] * max(1, schema.get("minItems", 1))
    return {"string": "x", "integer": 1, "number": 1.5, "boolean": True, "null": None}[kind]


def answers(row):
    """(what, parts) pairs; a part is ("text", str) or ("call", name, arguments)."""
    tools = [t["name"] for t in row["responses_create_params"].get("tools", [])]
    if "options" in row and "expected_answer" in row:
        right = row["expected_answer"]
        wrong = next(k for o in row["options"] for k in o if k != right)
        return [
            ("right letter", [("text", f"\\boxed{{{right}}}")]),
            ("wrong letter", [("text", f"\\boxed{{{wrong}}}")]),
        ]
    if "schema_str" in row:
        payload = instance(json.loads(row["schema_str"]))
        if row.get("response_mode") != "tool_call":
            return [("valid JSON", [("text", json.dumps(payload))]), ("not JSON", [("text", "{")])]
        name, key = row["tool_name"], row.get("tool_payload_key") or "extraction"
        other = next((t for t in tools if t != name), None)
        out = [
            ("the row's tool", [("call", name, {key: payload})]),
            ("text, then the row's tool", [("text", "Here it is."), ("call", name, {key: payload})]),
            ("no tool call", [("text", json.dumps(payload))]),
            ("two calls", [("call", name, {key: payload}), ("call", name, {key: payload})]),
        ]
        if other:
            out.append(("a distractor tool", [("call", other, {key: payload})]))
        return out
    if "answer" in row and "question" in row:
        return [
            ("right answer", [("text", f"<answer>{row['answer']}</answer>")]),
            ("wrong answer", [("text", "<answer>I do not know</answer>")]),
        ]
    if tools:
        return [
            ("a tool call", [("call", tools[0], {"city": "San Francisco"})]),
            ("text only", [("text", "It is sunny.")]),
        ]
    return [("text", [("text", "42")])]


def completion(parts):
    out = ""
    for part in parts:
        if part[0] == "text":
            out += part[1]
        else:
            call = json.dumps({"name": part[1], "arguments": part[2]})
            out += f"<tool_call>{call}</tool_call>"
    return out


def response(row, parts):
    output = []
    for i, part in enumerate(parts):
        if part[0] == "text":
            text = NeMoGymResponseOutputText(annotations=[], text=part[1])
            output.append(NeMoGymResponseOutputMessage(id=f"msg_{i}", content=[text]))
        else:
            output.append(
                NeMoGymResponseFunctionToolCall(
                    arguments=json.dumps(part[2]), call_id=f"call_{i}", name=part[1], id=f"fc_{i}"
                )
            )
    params = row["responses_create_params"]
    return NeMoGymResponse(
        id="resp",
        created_at=0,
        model="reference",
        object="response",
        parallel_tool_calls=True,
        tool_choice="auto",
        tools=params.get("tools", []),
        output=output,
    ).model_dump(mode="json", exclude_none=True)


def post(opener, url, body):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with opener.open(request, timeout=120) as answer:
        return json.loads(answer.read())


def main():
    url, path = sys.argv[1].rstrip("/"), sys.argv[2]
    items = []
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            row = json.loads(text)
            for what, parts in answers(row):
                opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
                post(opener, f"{url}/seed_session", {})
                verdict = post(opener, f"{url}/verify", {**row, "response": response(row, parts)})
                items.append(
                    {"line": line, "what": what, "completion": completion(parts), "reward": verdict["reward"]}
                )
    print(json.dumps({"items": items}))


if __name__ == "__main__":
    main()
