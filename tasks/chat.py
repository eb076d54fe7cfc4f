"""Talk to a trained model: one prompt, an interactive multi-turn chat, or a file of conversations.

``python chat.py init_from=<run dir | models/...> series=<csv> prompt="What is the trend?"``; ``audio=<wav>``
likewise; several inputs as ``audio=[a.wav,b.wav]``. Without ``prompt=``: an interactive chat that keeps
its history (``/audio <path>`` and ``/series <path>`` attach inputs to the next message, ``/reset``, ``/quit``).
``input=<jsonl|json> output=<jsonl>``: answer every conversation of a record file. Tokens stream to the
terminal as they are generated. Every other ``key=value`` is a train.py override (``llm=...``,
``data.system_prompt=...``); ``max_new_tokens=`` (256) caps an answer. The model is built by tasks.runner.build exactly as ``stage=evaluate`` builds it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

import torch

from data.collate import ConversationCollator
from data.dataset import ConversationDataset

INPUT_KEYS = ("audio", "series")  # the plugins' input_key names (Modality.input_key): inputs on the command line
CHAT_KEYS = ("init_from", "prompt", "input", "output", "max_new_tokens") + INPUT_KEYS
COMMANDS = {f"/{k}": k for k in INPUT_KEYS}


def parse_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``key=value`` arguments into chat settings and train.py overrides; ``[a,b]`` values become lists."""
    mine: dict[str, Any] = {}
    rest: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ValueError(f"chat.py: arguments are key=value, got {arg!r}")
        if key in CHAT_KEYS:
            if value.startswith("[") and value.endswith("]"):
                mine[key] = [v.strip() for v in value[1:-1].split(",") if v.strip()]
            else:
                mine[key] = value
        else:
            rest.append(arg)
    if "init_from" not in mine:
        raise ValueError("chat.py: init_from=<run dir, .ckpt or models/<name>> is required")
    if ("input" in mine) != ("output" in mine):
        raise ValueError("chat.py: input=<records> and output=<jsonl> go together")
    return mine, rest


class Chat:
    """A built model plus a conversation: ``ask`` appends a user turn (with its inputs) and answers it."""

    def __init__(self, model: Any, modalities: dict[str, Any], placeholder_ids: dict[str, int],
                 system_prompt: str | None, max_new_tokens: int = 256, max_length: int = 4096) -> None:
        self.model, self.modalities, self.system_prompt = model, modalities, system_prompt
        self.collate = ConversationCollator(model.tokenizer, modalities, placeholder_ids, max_length, generate=True)
        self.max_new_tokens = max_new_tokens
        self.reset()

    def reset(self) -> None:
        self.turns: list[dict[str, str]] = []
        self.refs: dict[str, list[Any]] = {}

    def attach(self, key: str, paths: Iterable[str]) -> list[Any]:
        """Refs for ``paths`` of command-line kind ``key`` (audio, series), checked to load now (one line if not)."""
        plugin = self.plugin_for(key)
        refs = [plugin.ref_for(p) for p in paths]
        for ref in refs:
            plugin.load(ref)  # bad input fails here, naming the file
        return refs

    def plugin_for(self, key: str) -> Any:
        """The plugin whose inputs come as ``key=`` (Modality.input_key)."""
        for m in self.modalities.values():
            if m.input_key == key:
                return m
        raise ValueError(f"{key}=: this model reads {sorted(m.input_key for m in self.modalities.values())}, not {key}")

    def ask(self, text: str, inputs: dict[str, list[Any]] | None = None,
            stream: Callable[[str], None] | None = None) -> str:
        """Answer ``text`` (its inputs' placeholders are prepended when the text has none) in the running chat."""
        for name, refs in (inputs or {}).items():
            placeholder = self.modalities[name].placeholder
            missing = len(refs) - text.count(placeholder)
            if missing > 0:
                text = "\n".join([placeholder] * missing) + "\n" + text
            self.refs.setdefault(name, []).extend(refs)
        record = {"id": f"chat-{len(self.turns) // 2}", "where": f"chat turn {len(self.turns) // 2 + 1}",
                  **{k: list(v) for k, v in self.refs.items()},
                  "conversations": [*self.turns, {"from": "human", "value": text}]}
        try:
            sample = ConversationDataset([record], self.modalities, system_prompt=self.system_prompt)[0]
            batch = self.collate([sample])
        except ValueError:
            for name, refs in (inputs or {}).items():  # nothing of a refused turn stays in the chat
                del self.refs[name][len(self.refs[name]) - len(refs):]
            raise
        answer = self.generate(batch, stream)
        self.turns += [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
        return answer

    @torch.no_grad()
    def generate(self, batch: dict, stream: Callable[[str], None] | None) -> str:
        from transformers import TextStreamer

        streamer = None
        if stream is not None:
            class _Streamer(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                    stream(text)

            streamer = _Streamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        from tasks.evaluate import _to_device

        batch = _to_device(batch, self.model.device)
        return self.model.generate(batch, max_new_tokens=self.max_new_tokens, streamer=streamer)[0]


def interactive(chat: Chat, inputs: dict[str, list[Any]], read: Callable[[str], str] = input,
                out: TextIO = sys.stdout) -> None:
    """A multi-turn chat on the terminal (see the module docstring for the commands)."""
    pending = dict(inputs)
    print("chat: /audio <path>, /series <path> attach an input to your next message; /reset; /quit", file=out)
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            return
        if not line:
            continue
        cmd, _, arg = line.partition(" ")
        try:
            if cmd == "/quit":
                return
            if cmd == "/reset":
                chat.reset()
                pending = {}
                continue
            if cmd in COMMANDS:
                key = COMMANDS[cmd]
                pending.setdefault(chat.plugin_for(key).name, []).extend(chat.attach(key, [arg.strip()]))
                print(f"attached {arg.strip()}", file=out)
                continue
            chat.ask(line, pending, stream=lambda t: print(t, end="", flush=True, file=out))
            print(file=out)
            pending = {}
        except ValueError as e:
            print(f"error: {str(e).splitlines()[0]}", file=out)


def answer_file(model: Any, dm: Any, records: str, output: str, max_new_tokens: int) -> dict[str, Any]:
    """Answer every conversation of ``records`` (its last human turn) into ``output`` (jsonl: id, prediction)."""
    from tasks.evaluate import run_generation

    dm.files["eval"] = [records]
    dm._records.pop("eval", None)
    return run_generation(model, dm.eval_dataloader(), max_new_tokens, Path(output), desc="chat", unanswered_ok=True)


def main(argv: list[str]) -> None:
    from tasks.runner import build_trained

    settings, overrides = parse_args(argv)
    built = build_trained(settings["init_from"], overrides)
    model = built.model.eval()
    max_new = int(settings.get("max_new_tokens", 256))
    if "input" in settings:
        m = answer_file(model, built.dm, settings["input"], settings["output"], max_new)
        print(json.dumps({k: v for k, v in m.items() if not isinstance(v, (list, dict))}))
        return
    ids = {k: model.placeholder_ids[k] for k in built.modalities}
    chat = Chat(model, built.modalities, ids, built.system_prompt, max_new)
    inputs: dict[str, list[Any]] = {}
    for key in INPUT_KEYS:
        if key in settings:
            paths = settings[key] if isinstance(settings[key], list) else [settings[key]]
            inputs.setdefault(chat.plugin_for(key).name, []).extend(chat.attach(key, paths))
    if "prompt" in settings:
        chat.ask(settings["prompt"], inputs, stream=lambda t: print(t, end="", flush=True))
        print()
    else:
        interactive(chat, inputs)
