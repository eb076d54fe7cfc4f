"""Tokenise conversations, expand placeholders to N positions, label only answers, pad.

Segments come from the tokenizer's own chat template: the text a turn adds to the rendered
conversation is tokenised on its own, and assistant segments (answer + end-of-turn) carry
labels. Training and generation build prompts the same way, so they never disagree.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

IGNORE = -100


def render_segments(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """Chat template -> [(text, is_answer)], whose concatenation is the full rendered conversation."""
    segments: list[tuple[str, bool]] = []
    prev = ""
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if not prompt.startswith(prev):
                raise ValueError("chat template is not prefix-stable; cannot locate answer tokens")
            segments.append((prompt[len(prev):], False))
            prev = prompt
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(prev):
            raise ValueError("chat template is not prefix-stable; cannot locate answer tokens")
        segments.append((full[len(prev):], msg["role"] == "assistant"))
        prev = full
    if add_generation_prompt:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        segments.append((prompt[len(prev):], False))
    return [(t, a) for t, a in segments if t]


def tokenize_conversation(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in render_segments(tokenizer, messages, add_generation_prompt):
        seg = tokenizer.encode(text, add_special_tokens=False)
        ids += seg
        labels += seg if is_answer else [IGNORE] * len(seg)
    return ids, labels


def expand_placeholders(ids: list[int], labels: list[int], counts: dict[int, list[int]], sample: str,
                        readings: dict[int, list[list[int]]] | None = None) -> tuple[list[int], list[int]]:
    """Replace the k-th occurrence of each placeholder id by counts[id][k] copies of it, followed by
    ``readings[id][k]`` (the plugin's reading of that input as token ids; unlabelled) when given."""
    readings = readings or {}
    for pid, lengths in counts.items():
        found = sum(1 for t in ids if t == pid)
        if found != len(lengths):
            raise ValueError(f"{sample}: {found} placeholder token(s) id={pid} in the text but "
                             f"{len(lengths)} input(s) for them")
    out_ids: list[int] = []
    out_labels: list[int] = []
    seen = {pid: 0 for pid in counts}
    for t, lab in zip(ids, labels):
        if t in counts:
            n = counts[t][seen[t]]
            extra = readings[t][seen[t]] if t in readings else []
            seen[t] += 1
            out_ids += [t] * n + list(extra)
            out_labels += [IGNORE] * (n + len(extra))
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return out_ids, out_labels


class ConversationCollator:
    """Samples from ConversationDataset -> a padded batch.

    ``generate=True`` drops the final assistant turn (kept as the reference), adds the
    generation prompt and pads on the left, as decoder-only generation needs.
    """

    def __init__(self, tokenizer: Any, modalities: dict[str, Any], placeholder_ids: dict[str, int],
                 max_length: int = 1024, generate: bool = False, skip_bad: bool = False):
        self.tokenizer = tokenizer
        self.skip_bad = skip_bad  # a sample that cannot be encoded (placeholder/input count, too long) is skipped
        self.modalities = modalities
        self.placeholder_ids = placeholder_ids
        self.max_length = max_length
        self.generate = generate

    def _encode(self, s: dict) -> tuple[list[int], list[int], str | None]:
        messages = s["messages"]
        reference = s.get("reference")
        if self.generate:
            if messages[-1]["role"] == "assistant":
                reference = reference if reference is not None else messages[-1]["content"]
                messages = messages[:-1]
        ids, labels = tokenize_conversation(self.tokenizer, messages, add_generation_prompt=self.generate)
        counts: dict[int, list[int]] = {}
        readings: dict[int, list[list[int]]] = {}
        for name, m in self.modalities.items():
            tensors = s["inputs"].get(name, [])
            kind = s["kinds"].get(name)  # hidden: cached encoder output; symbols: one position per symbol
            length_fn = {"hidden": m.adapted_length, "symbols": int}.get(kind, m.output_length)
            pid = self.placeholder_ids[name]
            counts[pid] = [length_fn(int(t.shape[0])) for t in tensors]
            texts = s.get("readings", {}).get(name, [])
            if any(texts):
                readings[pid] = [self.tokenizer.encode(" " + t, add_special_tokens=False) if t else [] for t in texts]
        ids, labels = expand_placeholders(ids, labels, counts, s["where"], readings)
        if len(ids) > self.max_length:
            raise ValueError(f"{s['where']}: {len(ids)} tokens after placeholder expansion exceed "
                             f"data.max_length={self.max_length}")
        if not self.generate and all(lab == IGNORE for lab in labels):
            raise ValueError(f"{s['where']}: no answer tokens to learn from")
        return ids, labels, reference

    def __call__(self, samples: list[dict]) -> dict:
        skipped = [(s["skipped"], s["error"]) for s in samples if "skipped" in s]
        samples = [s for s in samples if "skipped" not in s]
        pad = self.tokenizer.pad_token_id
        encoded, kept = [], []
        for s in samples:  # the dataset skips what fails to load (skip_bad); these fail once tokenised
            try:
                encoded.append(self._encode(s))
                kept.append(s)
            except ValueError as e:
                if not self.skip_bad:
                    raise
                log.warning("skipping sample %s: %s", s["where"], e)
                skipped.append((s["where"], str(e).splitlines()[0]))
        samples = kept
        longest = max((len(e[0]) for e in encoded), default=0)
        B = len(encoded)
        input_ids = torch.full((B, longest), pad, dtype=torch.long)
        labels = torch.full((B, longest), IGNORE, dtype=torch.long)
        attention = torch.zeros((B, longest), dtype=torch.long)
        for i, (ids, lab, _) in enumerate(encoded):
            span = slice(longest - len(ids), longest) if self.generate else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            labels[i, span] = torch.tensor(lab)
            attention[i, span] = 1
        modal: dict[str, dict] = {}
        for name, m in self.modalities.items():
            tensors = [t for s in samples for t in s["inputs"].get(name, [])]
            if not tensors:
                continue
            kinds = {s["kinds"][name] for s in samples if name in s["kinds"]}
            if len(kinds) != 1:
                raise ValueError(f"batch mixes input kinds {sorted(kinds)} for {name}")
            values, mask = m.collate_features(tensors)
            owner = [i for i, s in enumerate(samples) for _ in s["inputs"].get(name, [])]
            modal[name] = {"kind": kinds.pop(), "values": values, "mask": mask,
                           "sample_index": torch.tensor(owner, dtype=torch.long)}
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "modal": modal,
                "ids": [s["id"] for s in samples], "types": [s.get("type", "chat") for s in samples],
                "references": [e[2] for e in encoded], "skipped": skipped,
                "clip_labels": [s.get("clip_labels") for s in samples]}
