"""Deterministic synthetic chat data that teaches a tiny model the ChatML format and simple tool use.

Conversations are OpenAI-format message lists. Plain turns cover greetings and short templated questions
whose answers are always correct (small arithmetic, capitals, spelling, reversing and counting letters,
days of the week, comparisons). Tool turns use two tools, ``calculator`` and ``get_weather``: the assistant
emits only tool calls, a ``tool`` message returns the result, and the final answer quotes that result.

Run as ``python -m qwen3next.train.synthetic OUT_DIR [--n-train N --n-heldout N --seed S]``; the chat files
use the document layout of ``qwen3next.train.documents`` (each document followed by a ``<|endoftext|>`` line).

``render_chatml`` is a self-contained renderer of Qwen3's ChatML format (``<|im_start|>ROLE\\n…<|im_end|>\\n`` turns,
as Qwen3's chat template writes them). It does not use the runtime template in ``qwen3next/tokenizer.py``; the two
should agree token for token.

The policy the data teaches is consistent: one-step arithmetic on numbers up to 20 is answered directly,
anything bigger or with several operators goes to the calculator (asked only when the tools are offered), and
weather goes to ``get_weather`` (without tools, the assistant says it cannot check the weather).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from qwen3next.train.documents import join_documents

CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with integers, + - * / and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "The expression, e.g. 12*7"}},
            "required": ["expression"],
        },
    },
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
TOOLS = [CALCULATOR_TOOL, WEATHER_TOOL]

_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def render_chatml(
    conversation: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False
) -> str:
    """Render OpenAI-format messages as Qwen3 ChatML text, the way Qwen3's chat template does.

    Tool definitions go into the system turn (after the caller's system text and a blank line), assistant tool
    calls become ``<tool_call>`` blocks after the text content, and consecutive ``tool`` messages merge into one
    ``user`` turn of ``<tool_response>`` blocks. ``add_generation_prompt`` appends ``<|im_start|>assistant\\n``.
    """
    out = []
    messages = list(conversation)
    has_system = bool(messages) and messages[0].get("role") == "system"
    if tools:
        system = (messages[0]["content"] or "") + "\n\n" if has_system else ""
        tool_lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        out.append(f"<|im_start|>system\n{system}{_TOOLS_HEADER}{tool_lines}{_TOOLS_FOOTER}<|im_end|>\n")
    elif has_system:
        out.append(f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n")
    start = 1 if has_system else 0
    for i in range(start, len(messages)):
        message = messages[i]
        role = message.get("role")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise ValueError(f"message content must be a string or None, got {type(content).__name__}")
        if role == "tool":
            if i == start or messages[i - 1].get("role") != "tool":
                out.append("<|im_start|>user")
            out.append(f"\n<tool_response>\n{content}\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1].get("role") != "tool":
                out.append("<|im_end|>\n")
        elif role in ("system", "user", "assistant"):
            out.append(f"<|im_start|>{role}\n{content}")
            for j, call in enumerate(message.get("tool_calls") or []):
                function = call.get("function", call)
                arguments = function["arguments"]
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments, ensure_ascii=False)
                if j > 0 or content:
                    out.append("\n")
                name = json.dumps(function["name"], ensure_ascii=False)
                out.append(f'<tool_call>\n{{"name": {name}, "arguments": {arguments}}}\n</tool_call>')
            out.append("<|im_end|>\n")
        else:
            raise ValueError(f"message role must be system, user, assistant or tool, got {role!r}")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# --------------------------------------------------------------------------------------------------------------
# Built-in facts

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasília", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Australia": "Canberra", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Ireland": "Dublin",
    "Netherlands": "Amsterdam", "Austria": "Vienna", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Chile": "Santiago",
}  # fmt: skip
WEATHER_CITIES = (
    "Paris", "Berlin", "Rome", "Madrid", "Lisbon", "Tokyo", "Beijing", "Cairo", "Nairobi", "Ottawa", "Lima",
    "Oslo", "Stockholm", "Warsaw", "Athens", "Dublin", "Vienna", "Bangkok", "Seoul", "London", "New York",
    "Sydney", "Toronto", "Chicago", "Mumbai", "Istanbul", "Moscow", "Amsterdam", "Prague", "Santiago",
)  # fmt: skip
WORDS = (
    "apple", "garden", "river", "window", "yellow", "pencil", "candle", "bridge", "orange", "planet", "silver",
    "dragon", "forest", "castle", "button", "rabbit", "summer", "winter", "basket", "mirror", "cat", "dog",
    "house", "music", "water", "green", "table", "chair", "bread", "cloud", "banana", "school", "friend",
    "number", "letter", "flower", "market", "ticket", "rocket", "island", "monkey", "pepper", "coffee",
)  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
CONDITIONS = ("sunny", "cloudy", "partly cloudy", "rainy", "windy", "foggy", "stormy", "snowy")  # snowy last
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You are a friendly assistant that answers simple questions.",
    "You are a concise assistant.",
)
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


def fake_weather(city: str, variant: int = 0) -> dict:
    """A deterministic fake weather report for ``city``; ``variant`` picks one of many reports per city."""
    digest = hashlib.sha256(f"{city}|{variant}".encode()).digest()
    temperature = digest[0] % 41 - 5
    conditions = CONDITIONS if temperature <= 2 else CONDITIONS[:-1]  # no snow when it is warm
    return {
        "city": city,
        "temperature_c": temperature,
        "condition": conditions[digest[1] % len(conditions)],
        "humidity": 20 + digest[2] % 76,
    }


# --------------------------------------------------------------------------------------------------------------
# Arithmetic: expressions are nested (left, op, right) tuples so that text and value come from one structure


def _format_expr(node: int | tuple, sep: str = "", top: bool = True) -> str:
    # Every nested operation is parenthesized, so the text never relies on precedence rules.
    if isinstance(node, int):
        return str(node)
    left, op, right = node
    text = f"{_format_expr(left, sep, False)}{sep}{op}{sep}{_format_expr(right, sep, False)}"
    return text if top else f"({text})"


def _eval_expr(node: int | tuple) -> int:
    if isinstance(node, int):
        return node
    left, op, right = node
    a, b = _eval_expr(left), _eval_expr(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    assert b != 0 and a % b == 0, "generated divisions are exact"
    return a // b


def _random_binary(rng: random.Random, low: int, high: int) -> tuple:
    op = rng.choice("+-*/")
    if op == "/":
        b = rng.randint(2, max(2, min(high, 30)))
        return (b * rng.randint(2, max(2, high // b)), op, b)
    if op == "*":
        return (rng.randint(max(2, low // 4), max(3, high // 4)), op, rng.randint(2, max(3, high // 8)))
    return (rng.randint(low, high), op, rng.randint(low, high))


def _random_calculation(rng: random.Random) -> tuple:
    if rng.random() < 0.6:
        return _random_binary(rng, 21, 999)
    inner = _random_binary(rng, 2, 60)
    op = rng.choice("+-*")
    other = rng.randint(2, 40)
    return (inner, op, other) if rng.random() < 0.5 else (other, op, inner)


# --------------------------------------------------------------------------------------------------------------
# Conversation generators: each returns the messages after the system prompt


def _greeting(rng: random.Random) -> list[dict]:
    user = rng.choice(("Hello!", "Hi!", "Hi there.", "Good morning!", "Hey, how are you?", "Good evening."))
    reply = rng.choice(
        ("Hello! How can I help you today?", "Hi! What can I do for you?", "Hello! What would you like to know?")
    )
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _small_arithmetic(rng: random.Random) -> list[dict]:
    op = rng.choice("+-*/")
    if op == "/":
        b = rng.randint(1, 10)
        a = b * rng.randint(0, 10)
    else:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if op == "-" and b > a:
            a, b = b, a
    value = _eval_expr((a, op, b))
    words = _OP_WORDS[op]
    user = rng.choice((f"What is {a} {words} {b}?", f"What's {a} {op} {b}?", f"Compute {a} {op} {b}."))
    reply = rng.choice((f"{a} {words} {b} is {value}.", f"{a} {op} {b} = {value}.", f"The answer is {value}."))
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _capital(rng: random.Random) -> list[dict]:
    country = rng.choice(sorted(CAPITALS))
    user = rng.choice((f"What is the capital of {country}?", f"Which city is the capital of {country}?"))
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": f"The capital of {country} is {CAPITALS[country]}."},
    ]


def _word_task(rng: random.Random) -> list[dict]:
    word = rng.choice(WORDS)
    task = rng.randrange(3)
    if task == 0:
        user = rng.choice((f"How do you spell {word}?", f"Spell the word '{word}'."))
        reply = f"{word} is spelled {'-'.join(word.upper())}."
    elif task == 1:
        user = rng.choice((f"Reverse the word '{word}'.", f"What is '{word}' spelled backwards?"))
        reply = f"'{word}' reversed is '{word[::-1]}'."
    else:
        user = rng.choice((f"How many letters are in the word '{word}'?", f"Count the letters in '{word}'."))
        reply = f"The word '{word}' has {len(word)} letters."
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _counting(rng: random.Random) -> list[dict]:
    start = rng.randint(1, 20)
    stop = start + rng.randint(2, 8)
    if rng.random() < 0.5:
        user = f"Count from {start} to {stop}."
        numbers = range(start, stop + 1)
    else:
        user = f"Count down from {stop} to {start}."
        numbers = range(stop, start - 1, -1)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": ", ".join(map(str, numbers)) + "."}]


def _days(rng: random.Random) -> list[dict]:
    i = rng.randrange(7)
    day = DAYS[i]
    if rng.random() < 0.5:
        user, reply = f"What day comes after {day}?", f"The day after {day} is {DAYS[(i + 1) % 7]}."
    else:
        user, reply = f"What day comes before {day}?", f"The day before {day} is {DAYS[(i - 1) % 7]}."
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _compare(rng: random.Random) -> list[dict]:
    a, b = rng.sample(range(1, 200), 2)
    if rng.random() < 0.5:
        user, reply = f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}."
    else:
        user, reply = f"Which is smaller, {a} or {b}?", f"{min(a, b)} is smaller than {max(a, b)}."
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _weather_without_tools(rng: random.Random) -> list[dict]:
    city = rng.choice(WEATHER_CITIES)
    return [
        {"role": "user", "content": f"What's the weather like in {city}?"},
        {"role": "assistant", "content": "I can't check the weather because I don't have access to a weather tool."},
    ]


_PLAIN = (_greeting, _small_arithmetic, _capital, _word_task, _counting, _days, _compare)


def _tool_call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _calculator(rng: random.Random, call_index: int) -> list[dict]:
    node = _random_calculation(rng)
    expression, value = _format_expr(node), _eval_expr(node)
    left, op, right = node
    if isinstance(left, int) and isinstance(right, int) and rng.random() < 0.4:
        user = f"What is {left} {_OP_WORDS[op]} {right}?"
    else:
        template = ("What is {}?", "Calculate {}.", "Can you compute {} for me?", "Use the calculator to work out {}.")
        user = rng.choice(template).format(_format_expr(node, " "))
    call_id = f"call_{call_index}"
    final = rng.choice((f"{expression} = {value}.", f"The answer is {value}.", f"The result is {value}."))
    return [
        {"role": "user", "content": user},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [_tool_call(call_id, "calculator", {"expression": expression})],
        },
        {"role": "tool", "tool_call_id": call_id, "content": str(value)},
        {"role": "assistant", "content": final},
    ]


def _describe_weather(report: dict) -> str:
    return f"{report['condition']}, {report['temperature_c']}°C, humidity {report['humidity']}%"


def _weather_question(rng: random.Random, cities: list[str]) -> str:
    if len(cities) == 2:
        return rng.choice(
            (
                f"What's the weather in {cities[0]} and {cities[1]}?",
                f"Compare the weather in {cities[0]} and {cities[1]}.",
            )
        )
    city = cities[0]
    return rng.choice(
        (
            f"What's the weather like in {city}?",
            f"How is the weather in {city} today?",
            f"What is the weather in {city} right now?",
        )
    )


def _weather(rng: random.Random, call_index: int) -> list[dict]:
    cities = rng.sample(WEATHER_CITIES, 2 if rng.random() < 0.25 else 1)
    reports = [fake_weather(city, rng.randrange(1_000_000)) for city in cities]
    ids = [f"call_{call_index + k}" for k in range(len(cities))]
    calls = [_tool_call(i, "get_weather", {"city": city}) for i, city in zip(ids, cities, strict=True)]
    if len(cities) == 1:
        r = reports[0]
        final = rng.choice(
            (
                f"In {r['city']} it is {r['condition']} and {r['temperature_c']}°C, with {r['humidity']}% humidity.",
                f"The weather in {r['city']}: {_describe_weather(r)}.",
            )
        )
    else:
        final = " ".join(f"{r['city']}: {_describe_weather(r)}." for r in reports)
    messages = [{"role": "user", "content": _weather_question(rng, cities)}]
    messages.append({"role": "assistant", "content": "", "tool_calls": calls})
    for call_id, report in zip(ids, reports, strict=True):
        messages.append({"role": "tool", "tool_call_id": call_id, "content": json.dumps(report, ensure_ascii=False)})
    messages.append({"role": "assistant", "content": final})
    return messages


@dataclass
class ChatExample:
    """One synthetic conversation and the tools offered to it (``None``: no tools block)."""

    messages: list[dict]
    tools: list[dict] | None


def generate_chat_examples(n: int, seed: int, split: str = "train") -> list[ChatExample]:
    """``n`` deterministic conversations for (``seed``, ``split``), each with the tool list it is rendered with."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"qwen3next-synthetic:{split}:{seed}")
    examples = []
    for _ in range(n):
        kind = rng.random()
        tools = TOOLS if kind >= 0.45 else None
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
        turns = 2 if rng.random() < 0.25 else 1
        for turn in range(turns):
            calls = sum(len(m.get("tool_calls", [])) for m in messages)
            if tools is None:
                generator = _weather_without_tools if rng.random() < 0.05 else rng.choice(_PLAIN)
                messages += generator(rng)
            elif (turn == 0 and kind < 0.60) or (turn > 0 and rng.random() < 0.4):
                messages += rng.choice(_PLAIN)(rng)
            elif rng.random() < 0.6:
                messages += _calculator(rng, calls)
            else:
                messages += _weather(rng, calls)
        examples.append(ChatExample(messages, tools))
    return examples


def generate_conversations(n: int, seed: int) -> list[list[dict]]:
    """``n`` deterministic OpenAI-format conversations (the messages of ``generate_chat_examples``)."""
    return [example.messages for example in generate_chat_examples(n, seed)]


def _tool_eval_items(n: int, seed: int, train_prompts: set[str]) -> list[dict]:
    # Held-out single-turn prompts, unique within the file: 20% plain questions asked with the tools offered
    # (no call expected), 40% calculator, 40% weather. The prompt space of some families is small, so many
    # prompts also occur in the training text; `seen_in_train` marks them so an evaluation can split on it.
    rng = random.Random(f"qwen3next-synthetic:tool-eval:{seed}")
    items = []
    used = set()
    while len(items) < n:
        system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
        kind = rng.random()
        if kind < 0.2:
            conversation = rng.choice(_PLAIN)(rng)
        elif kind < 0.6:
            conversation = _calculator(rng, 0)
        else:
            conversation = _weather(rng, 0)
        messages = system + conversation[:1]
        key = json.dumps(messages)
        if key in used:
            continue
        used.add(key)
        calls = conversation[1].get("tool_calls", [])
        expected = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])} for c in calls]
        items.append(
            {
                "messages": messages,
                "prompt": render_chatml(messages, TOOLS, add_generation_prompt=True),
                "expected_tool_calls": expected,
                "expected_answer": None if expected else conversation[-1]["content"],
                "seen_in_train": conversation[0]["content"] in train_prompts,
            }
        )
    return items


def write_synthetic(out_dir: Path, n_train: int, n_heldout: int, seed: int, n_tool_eval: int = 200) -> dict:
    """Write ``chat_train.txt``, ``chat_heldout.txt`` (ChatML documents, each followed by ``<|endoftext|>``)
    and ``tool_eval.jsonl`` (held-out prompts with the expected tool calls). Returns file sizes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = generate_chat_examples(n_train, seed, "train")
    heldout = generate_chat_examples(n_heldout, seed, "heldout")
    sizes = {}
    for name, examples in (("chat_train.txt", train), ("chat_heldout.txt", heldout)):
        data = join_documents(render_chatml(e.messages, e.tools) for e in examples).encode("utf-8")
        (out_dir / name).write_bytes(data)
        sizes[name] = len(data)
    seen = {m["content"] for e in train for m in e.messages if m["role"] == "user"}
    items = _tool_eval_items(n_tool_eval, seed, seen)
    data = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items).encode("utf-8")
    (out_dir / "tool_eval.jsonl").write_bytes(data)
    sizes["tool_eval.jsonl"] = len(data)
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic ChatML conversations and a tool-call eval set.")
    parser.add_argument("out_dir", nargs="?", default="runs/corpus/chat", type=Path)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-heldout", type=int, default=1000)
    parser.add_argument("--n-tool-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = write_synthetic(args.out_dir, args.n_train, args.n_heldout, args.seed, args.n_tool_eval)
    for name, size in sizes.items():
        print(f"{args.out_dir / name}: {size:,} bytes")


if __name__ == "__main__":
    main()
