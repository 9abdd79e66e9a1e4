"""OpenAI's function-calling loop against `weitiao serve`, unchanged: ask, run the function the model calls, send
its output back, print the answer.

    weitiao serve outputs/tool_calling --name tools --port 8000 &
    python examples/tool_calling/weather_client.py --url http://127.0.0.1:8000/v1 --model tools
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}]


def get_current_weather(city: str, unit: str = "celsius") -> str:
    """The 'real' function: a fixed answer, so the model's final reply can be checked against it."""
    return json.dumps({"city": city, "temperature": 22 if unit == "celsius" else 72, "unit": unit, "sky": "sunny"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="tools")
    parser.add_argument("--question", default="What's the weather like in Paris today?")
    parser.add_argument("--tool-choice", default="auto", help="auto, required, none, or a function name")
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key="none")
    choice = args.tool_choice if args.tool_choice in ("auto", "required", "none") else {
        "type": "function", "function": {"name": args.tool_choice}}
    messages = [{"role": "user", "content": args.question}]
    reply = client.chat.completions.create(model=args.model, messages=messages, tools=TOOLS, tool_choice=choice,
                                           temperature=0, max_tokens=200).choices[0]
    print(f"finish_reason: {reply.finish_reason}")
    if not reply.message.tool_calls:
        print(f"answer without a call: {reply.message.content}")
        return
    messages.append(reply.message)
    for call in reply.message.tool_calls:
        arguments = json.loads(call.function.arguments)
        print(f"call: {call.function.name}({arguments})")
        try:  # a model may call a function that does not exist, or with arguments it does not take
            output = get_current_weather(**arguments) if call.function.name == "get_current_weather" else \
                json.dumps({"error": f"no function {call.function.name}"})
        except TypeError as error:
            output = json.dumps({"error": str(error)})
        print(f"tool output: {output}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
    answer = client.chat.completions.create(model=args.model, messages=messages, tools=TOOLS, temperature=0,
                                            max_tokens=200).choices[0]
    print(f"answer: {answer.message.content}")


if __name__ == "__main__":
    main()
