"""lm-evaluation-harness against `qwen3next serve`: loglikelihood multiple choice through /v1/completions.

    python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install "lm-eval[api]" transformers   # once, apart
    python scripts/lm_eval_demo.py --lm-eval /tmp/lmeval/bin/lm_eval [--model DIR] [--out DIR] [--threads 2]

Writes two small multiple-choice tasks (YAML + JSONL, nothing downloaded) to `--out`, starts `qwen3next serve` on
a loopback port and runs lm-eval's `local-completions` model on them. For every (question, choice) lm-eval sends
the tokens of question + choice with `echo: true, logprobs: 1, max_tokens: 1` and sums the echoed prompt logprobs
of the choice's tokens; the most likely choice is the answer (acc; acc_norm divides by the choice's length in
characters). lm-eval tokenizes with the model directory's tokenizer (transformers, offline) and sends token ids.

The tasks test what the embedded demo model was trained on, so they measure memorisation, not knowledge:
- qwen3next_demo_facts (34 questions): the synthetic chat facts of its training mix (capitals, the days of the
  week, which of two numbers is larger, small arithmetic), asked and answered in ChatML;
- qwen3next_demo_austen (15 questions): cloze items from the opening lines and main characters of Austen's novels.
lm-eval is kept out of this project's environment (it pins its own dependencies): install it in a separate venv.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "qwen3next" / "data" / "demo"
SERVED_NAME = "demo"

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Greece", "Athens"),
            ("Austria", "Vienna"), ("Peru", "Lima"), ("South Korea", "Seoul")]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
# (context, right answer, wrong answers): the text as in the novels (Project Gutenberg / janeaustenr spelling)
AUSTEN = [
    ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
     "of a", "wife", ["horse", "house", "letter"]),
    ("However little known the feelings or views of such a man may be on his first entering a neighbourhood, this "
     "truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property "
     "of some one or other of their", "daughters", ["sons", "servants", "horses"]),
    ("\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that", "Netherfield Park is let at last?",
     ["Pemberley is sold at last?", "Mansfield Park is let at last?", "Kellynch Hall is let at last?"]),
    ("Emma Woodhouse, handsome, clever, and", "rich", ["poor", "sad", "tall"]),
    ("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite "
     "some of the best blessings of existence; and had lived nearly twenty-one years in the world with very little "
     "to distress or", "vex her", ["please her", "amuse her", "feed her"]),
    ("The family of Dashwood had long been settled in", "Sussex", ["Kent", "Devonshire", "London"]),
    ("The family of Dashwood had long been settled in Sussex. Their estate was large, and their residence was at "
     "Norland", "Park", ["Abbey", "Hall", "Cottage"]),
    ("No one who had ever seen Catherine Morland in her infancy would have supposed her born to be an", "heroine",
     ["angel", "orphan", "actress"]),
    ("Sir Walter Elliot, of Kellynch Hall, in", "Somersetshire", ["Hertfordshire", "Derbyshire", "Kent"]),
    ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took up any "
     "book but the", "Baronetage", ["Bible", "newspaper", "almanac"]),
    ("Lady Catherine de", "Bourgh", ["Winter", "Vere", "Courcy"]),
    ("Elinor and", "Marianne", ["Lydia", "Harriet", "Catherine"]),
    ("Mr. Frank", "Churchill", ["Knightley", "Weston", "Elton"]),
    ("Harriet", "Smith", ["Bennet", "Price", "Morland"]),
    ("Sir Thomas", "Bertram", ["Elliot", "Lucas", "Middleton"]),
]

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: {delimiter}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def chatml(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def item(rng: random.Random, context: str, right: str, wrong: list[str]) -> dict:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "answer": choices.index(right)}


def facts_items(rng: random.Random) -> list[dict]:
    items = []
    cities = [c for _, c in CAPITALS]
    for k, (country, city) in enumerate(CAPITALS):
        wrong = [cities[(k + d) % len(cities)] for d in (3, 5, 8)]
        items.append(item(rng, chatml(f"What is the capital of {country}?"), f"The capital of {country} is {city}.",
                          [f"The capital of {country} is {w}." for w in wrong]))
    for k in range(4):
        day, after, before = DAYS[k * 2], DAYS[(k * 2 + 1) % 7], DAYS[(k * 2 - 1) % 7]
        wrong = [d for d in DAYS if d not in (day, after)][k:k + 3]
        items.append(item(rng, chatml(f"What day comes after {day}?"), f"The day after {day} is {after}.",
                          [f"The day after {day} is {w}." for w in wrong]))
        wrong = [d for d in DAYS if d not in (day, before)][k:k + 3]
        items.append(item(rng, chatml(f"What day comes before {day}?"), f"The day before {day} is {before}.",
                          [f"The day before {day} is {w}." for w in wrong]))
    for a, b in [(37, 112), (150, 9), (64, 46), (3, 199), (120, 21), (88, 91), (17, 71), (140, 104)]:
        hi, lo = max(a, b), min(a, b)
        items.append(item(rng, chatml(f"Which is larger, {a} or {b}?"), f"{hi} is larger than {lo}.",
                          [f"{lo} is larger than {hi}."]))
    for a, op, b, value in [(7, "plus", 5, 12), (9, "times", 3, 27), (15, "minus", 6, 9), (20, "divided by", 4, 5),
                            (8, "plus", 11, 19), (6, "times", 7, 42)]:
        wrong = [value + d for d in (-2, 1, 3)]
        items.append(item(rng, chatml(f"What is {a} {op} {b}?"), f"{a} {op} {b} is {value}.",
                          [f"{a} {op} {b} is {w}." for w in wrong]))
    return items


def write_tasks(out: Path) -> list[str]:
    """The tasks' JSONL and YAML files in `out`; returns the task names."""
    rng = random.Random(0)
    tasks = {"qwen3next_demo_facts": (facts_items(rng), '""'),  # the answer follows the chat prompt's newline
             "qwen3next_demo_austen": ([item(rng, *x) for x in AUSTEN], '" "')}
    out.mkdir(parents=True, exist_ok=True)
    for name, (items, delimiter) in tasks.items():
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(x) + "\n" for x in items))
        (out / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=json.dumps(str(data)),
                                                           delimiter=delimiter))
    return list(tasks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"qwen3next serve exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"qwen3next serve was not healthy after {timeout:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-eval", default=shutil.which("lm_eval") or shutil.which("lm-eval"),
                    help="lm-eval's command (default: lm_eval on PATH)")
    ap.add_argument("--model", default=str(DEMO), help="model directory to serve (default: the demo model)")
    ap.add_argument("--out", default=None, help="folder for the task files and lm-eval's results (default: temp)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--num-concurrent", type=int, default=4, help="lm-eval's concurrent requests")
    ap.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    args = ap.parse_args()
    if not args.lm_eval:
        raise SystemExit("lm-eval not found: install it apart (python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip "
                         "install 'lm-eval[api]' transformers) and pass --lm-eval /tmp/lmeval/bin/lm_eval")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qwen3next-lm-eval-"))
    tasks = write_tasks(out / "tasks")
    print(f"tasks written to {out / 'tasks'}: {', '.join(tasks)}", flush=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "qwen3next.cli", "serve", "--model", args.model, "--port",
                               str(port), "--threads", str(args.threads), "--served-model-name", SERVED_NAME,
                               "--log-level", "warning"])
    try:
        wait_healthy(base, server, timeout=300)
        model_args = (f"model={SERVED_NAME},base_url={base}/v1/completions,tokenizer_backend=huggingface,"
                      f"tokenizer={Path(args.model).resolve()},num_concurrent={args.num_concurrent},max_retries=1")
        cmd = [args.lm_eval, "run", "--model", "local-completions", "--model_args", model_args, "--tasks",
               ",".join(tasks), "--include_path", str(out / "tasks"), "--output_path", str(out / "results")]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        print("$ " + " ".join(cmd), flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        return subprocess.run(cmd, env=env).returncode
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
