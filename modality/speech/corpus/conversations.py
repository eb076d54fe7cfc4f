"""LLaSM/LLaVA-style instruct conversations about synthetic speech clips.

Why: answers are computed from the clip's text and its TTS parameters, so every question
(what was said, how many words, how fast / how high / which accent, spoken arithmetic,
comparisons of two clips) has an exact gold answer and per-type accuracy can be scored.

A record: {"id", "type", "turn_types", "answers", "speech": [paths relative to the json],
"conversations": [{"from": "human"|"gpt", "value"}...]}. ``type`` is the first question's
type, ``turn_types``/``answers`` hold the type and normalised gold answer of every gpt turn.
Each "<speech>" placeholder consumes the next path of "speech", in order.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PLACEHOLDER = "<speech>"
WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0..999 in English words ("one hundred and forty four")."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words supports 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def words(text: str) -> list[str]:
    """Spoken words of a transcript: contractions and hyphenated words count as one."""
    return WORD.findall(text)


@dataclass(frozen=True)
class Problem:
    """A spoken arithmetic question and its answer."""

    text: str
    answer: int


_OPS = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}
_ARITH_TEMPLATES = ["What is {a} {op} {b}?", "What's {a} {op} {b}?", "How much is {a} {op} {b}?",
                    "Can you tell me what {a} {op} {b} is?", "Calculate {a} {op} {b}.", "Please work out {a} {op} {b}."]


def make_problem(rng: random.Random) -> Problem:
    """Random small-number arithmetic (non-negative, exact division) phrased as a spoken question."""
    op = rng.choice(list(_OPS))
    if op == "plus":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        ans = a + b
    elif op == "minus":
        a, b = sorted((rng.randint(0, 20), rng.randint(0, 20)), reverse=True)
        ans = a - b
    elif op == "times":
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        ans = a * b
    else:
        b, ans = rng.randint(1, 10), rng.randint(0, 10)
        a = b * ans
    text = rng.choice(_ARITH_TEMPLATES).format(a=number_words(a), op=op, b=number_words(b))
    return Problem(text[0].upper() + text[1:], ans)


# ---------------------------------------------------------------- question phrasings
# (question, answer template); "{x}" in the answer is the gold value.
Q_TRANSCRIBE = ["Transcribe this audio.", "What does the speaker say?", "Write down exactly what is said.",
                "Please repeat what you hear.", "Can you transcribe the recording?", "What is being said here?",
                "Give me a transcript of this clip.", "Repeat the sentence word for word."]
Q_WORDS = ["How many words are spoken in this clip?", "Count the words the speaker says.",
           "How many words does the speaker say?", "What is the number of words in this recording?"]
Q_FIRST = ["What is the first word spoken?", "Which word does the speaker say first?", "What word does the clip start with?"]
Q_LAST = ["What is the last word spoken?", "Which word does the speaker end with?", "What is the final word in the clip?"]
Q_ARITH_PROMPT = ["", "Answer the question in the recording.", "Please answer this.", "Reply with just the number.",
                  "Solve what the speaker asks.", "Listen and answer."]
Q_PITCH2 = ["Is the speaker's voice pitched high or low?", "Does this person speak in a high or a low voice?",
            "High or low pitch: which is it?", "Would you call this voice high-pitched or low-pitched?"]
Q_PITCH3 = ["Is the voice low, medium or high in pitch?", "Describe the pitch of the voice: low, medium or high?"]
Q_SPEED2 = ["Is the speaker talking fast or slowly?", "Does this person speak quickly or slowly?",
            "Fast or slow: how is this spoken?", "Is the speech rate fast or slow?"]
Q_SPEED3 = ["Is the speaking rate slow, normal or fast?", "How fast is the speaker talking: slow, normal or fast?"]
Q_ACCENT = ["Which accent does the speaker have?", "What accent is this?", "Where is this accent from?",
            "Identify the speaker's accent."]
Q_REGION = ["Does the speaker sound American, British or Caribbean?", "Is this an American, a British or a Caribbean accent?",
            "Which kind of English is this: American, British or Caribbean?"]
Q_GENDER = ["Is this a male or a female voice?", "Is the speaker a man or a woman?", "Does this sound like a man or a woman?"]
Q_CMP_SPEED = [("Which of the two speakers talks faster?", "faster"), ("Which clip is spoken more quickly?", "faster"),
               ("Which of the two speakers talks more slowly?", "slower"), ("Which recording is slower?", "slower")]
Q_CMP_PITCH = [("Which of the two voices is higher?", "higher"), ("Which clip has the higher-pitched voice?", "higher"),
               ("Which of the two voices is lower?", "lower"), ("Which speaker uses a lower pitch?", "lower")]
Q_TWO = ["Transcribe both clips, one per line.", "What do the two speakers say? One line each.",
         "Write down both recordings, in order, one per line."]
LEAD_INS = ["Here is a recording:", "Listen to this clip:", "Audio:", "I recorded this:", "Someone said this:"]
PAIR_LAYOUTS = ["{q}\nFirst clip: {s}\nSecond clip: {s}", "{s} {s}\n{q}", "{q} {s} {s}", "Clip one: {s} Clip two: {s} {q}"]


def attach(question: str, n_clips: int, rng: random.Random) -> str:
    """Put ``n_clips`` placeholders at the start, middle or end of a human turn."""
    if n_clips == 2:
        return rng.choice(PAIR_LAYOUTS).format(q=question, s=PLACEHOLDER).strip()
    where = rng.choice(["start", "end", "middle"])
    if not question:
        return PLACEHOLDER
    if where == "start":
        return f"{PLACEHOLDER}\n{question}"
    if where == "end":
        return f"{question}\n{PLACEHOLDER}"
    return f"{rng.choice(LEAD_INS)} {PLACEHOLDER} {question}"


Turn = tuple[str, str, str]  # (question without placeholders, answer text, normalised gold)


def ask_transcribe(c: dict, rng: random.Random) -> Turn:
    return rng.choice(Q_TRANSCRIBE), c["text"], c["text"]


def ask_word_count(c: dict, rng: random.Random) -> Turn:
    n = len(words(c["text"]))
    return rng.choice(Q_WORDS), rng.choice(["{x}", "{x} words.", "There are {x} words."]).format(x=n), str(n)


def ask_first_word(c: dict, rng: random.Random) -> Turn:
    w = words(c["text"])[0]
    return rng.choice(Q_FIRST), rng.choice(["{x}", 'The first word is "{x}".']).format(x=w), w.lower()


def ask_last_word(c: dict, rng: random.Random) -> Turn:
    w = words(c["text"])[-1]
    return rng.choice(Q_LAST), rng.choice(["{x}", 'The last word is "{x}".']).format(x=w), w.lower()


def ask_arithmetic(c: dict, rng: random.Random) -> Turn:
    return rng.choice(Q_ARITH_PROMPT), str(c["answer"]), str(c["answer"])


def ask_pitch(c: dict, rng: random.Random) -> Turn:
    cls = c["pitch_class"]
    q = rng.choice(Q_PITCH2 if cls != "medium" and rng.random() < 0.7 else Q_PITCH3)
    return q, f"{cls.capitalize()}.", cls


def ask_speed(c: dict, rng: random.Random) -> Turn:
    cls = c["speed_class"]
    q = rng.choice(Q_SPEED2 if cls != "normal" and rng.random() < 0.7 else Q_SPEED3)
    return q, f"{cls.capitalize()}.", cls


def ask_accent(c: dict, rng: random.Random) -> Turn:
    return rng.choice(Q_ACCENT), f"{c['accent']}.", c["accent"].lower()


def ask_accent_region(c: dict, rng: random.Random) -> Turn:
    return rng.choice(Q_REGION), f"{c['accent_region']}.", c["accent_region"].lower()


def ask_gender(c: dict, rng: random.Random) -> Turn:
    return rng.choice(Q_GENDER), f"{c['gender'].capitalize()}.", c["gender"]


SINGLE: dict[str, Callable[[dict, random.Random], Turn]] = {
    "transcribe": ask_transcribe, "word_count": ask_word_count, "first_word": ask_first_word,
    "last_word": ask_last_word, "pitch": ask_pitch, "speed": ask_speed, "accent": ask_accent,
    "accent_region": ask_accent_region, "gender": ask_gender,
}
PAIR_TYPES = ("compare_speed", "compare_pitch", "transcribe_two")
TRAIN_WEIGHTS: dict[str, float] = {
    "transcribe": 0.16, "word_count": 0.07, "first_word": 0.05, "last_word": 0.05, "arithmetic": 0.14,
    "pitch": 0.09, "speed": 0.09, "accent": 0.06, "accent_region": 0.05, "gender": 0.06,
    "compare_speed": 0.06, "compare_pitch": 0.06, "transcribe_two": 0.03,
}
# Held-out voices have accents never named in training; eval asks their (seen) region instead.
# Eval types are equally frequent so that per-type accuracy has similar support everywhere.
EVAL_WEIGHTS = {k: 1.0 for k in TRAIN_WEIGHTS if k != "accent"}


def _rate(c: dict) -> float:
    return len(words(c["text"])) / max(c["duration"], 1e-6)


def pick_pair(pool: Sequence[dict], kind: str, rng: random.Random, tries: int = 200) -> tuple[dict, dict] | None:
    """Two clips whose speed (or pitch) classes differ and whose measured order agrees."""
    for _ in range(tries):
        a, b = rng.sample(list(pool), 2)
        if kind == "compare_speed":
            if a["speed_class"] != b["speed_class"] and (a["speed"] - b["speed"]) * (_rate(a) - _rate(b)) > 0:
                return a, b
        elif kind == "compare_pitch":
            same_speaker = a["variant"] == b["variant"]
            ok_f0 = (a["pitch"] - b["pitch"]) * (a.get("f0_hz", 0) - b.get("f0_hz", 0)) > 0
            if same_speaker and a["pitch_class"] != b["pitch_class"] and ok_f0:
                return a, b
        else:
            return a, b
    return None


def ask_pair(kind: str, a: dict, b: dict, rng: random.Random) -> Turn:
    if kind == "transcribe_two":
        return rng.choice(Q_TWO), f"{a['text']}\n{b['text']}", f"{a['text']}\n{b['text']}"
    q, direction = rng.choice(Q_CMP_SPEED if kind == "compare_speed" else Q_CMP_PITCH)
    key = "speed" if kind == "compare_speed" else "pitch"
    first_more = a[key] > b[key]
    gold = "first" if first_more == (direction in ("faster", "higher")) else "second"
    return q, rng.choice(["The {x} one.", "The {x} clip.", "The {x}."]).format(x=gold), gold


def _pick_single(kind: str, pool: Sequence[dict], rng: random.Random) -> dict | None:
    """A clip for a single-clip question, balancing the answer classes of label questions."""
    field = {"pitch": "pitch_class", "speed": "speed_class", "accent": "voice", "accent_region": "accent_region", "gender": "gender"}.get(kind)
    if field is None:
        return rng.choice(list(pool))
    values = sorted({c[field] for c in pool})
    target = rng.choice(values)
    return rng.choice([c for c in pool if c[field] == target])


def make_record(
    kind: str, pool: Sequence[dict], arith: Sequence[dict], rng: random.Random, rec_id: str,
    path_of: Callable[[dict], str], n_followups: int = 0,
) -> dict | None:
    """One conversation of type ``kind`` (+ follow-up turns about the same clips); None if the pool can't serve it."""
    if kind == "arithmetic":
        if not arith:
            return None
        clips = [arith[0]]  # the caller hands each arithmetic record its own clip
        turns = [ask_arithmetic(clips[0], rng)]
    elif kind in PAIR_TYPES:
        pair = pick_pair(pool, kind, rng) if len(pool) >= 2 else None
        if pair is None:
            return None
        clips = list(pair)
        turns = [ask_pair(kind, *pair, rng)]
    else:
        clip = _pick_single(kind, pool, rng)
        if clip is None:
            return None
        clips = [clip]
        turns = [SINGLE[kind](clip, rng)]
    types = [kind]
    # Follow-ups ask about the clip already in context: no new placeholder.
    followups = ["transcribe", "word_count", "speed", "pitch", "gender", "first_word"]
    for f in rng.sample(followups, min(n_followups, len(followups))):
        if f in types:
            continue
        target = clips[0] if len(clips) == 1 else clips[rng.randrange(2)]
        q, a, g = SINGLE[f](target, rng)
        if len(clips) == 2:
            which = "first" if target is clips[0] else "second"
            q = f"About the {which} clip: {q[0].lower()}{q[1:]}"
        turns.append((q, a, g))
        types.append(f)
    conv = []
    for i, (q, a, _) in enumerate(turns):
        conv.append({"from": "human", "value": attach(q, len(clips), rng) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {
        "id": rec_id, "type": kind, "turn_types": types, "answers": [g for _, _, g in turns],
        "speech": [path_of(c) for c in clips], "conversations": conv,
    }


def plan_types(n: int, weights: dict[str, float], seed: int, split: str) -> list[str]:
    """Exactly proportional type counts (largest remainder), in a deterministic shuffled order."""
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[: n - sum(counts.values())]:
        counts[k] += 1
    kinds = [k for k in weights for _ in range(counts[k])]
    random.Random(f"{seed}:types:{split}").shuffle(kinds)
    return kinds


def default_weights(split: str) -> dict[str, float]:
    return TRAIN_WEIGHTS if split == "train" else EVAL_WEIGHTS


def make_conversations(
    pool: Sequence[dict], arith: Sequence[dict], n: int, seed: int, split: str,
    path_of: Callable[[dict], str] = lambda c: c["audio_filepath"],
    weights: dict[str, float] | None = None, max_followups: int = 2,
) -> list[dict]:
    """``n`` records with type counts proportional to ``weights``; a type the pool can't serve falls back to transcribe.

    ``pool``: manifest rows (text + TTS labels); ``arith``: rows with "answer" for spoken
    arithmetic, each used by one record (cycled if there are fewer). Eval (max_followups=0)
    gives one question per record for clean scoring.
    """
    if not pool:
        raise ValueError(f"empty clip pool for split {split!r}")
    out, n_arith = [], 0
    for i, kind in enumerate(plan_types(n, weights or default_weights(split), seed, split)):
        rng = random.Random(f"{seed}:conv:{split}:{i}")
        n_follow = rng.randint(0, max_followups) if max_followups else 0
        own = [arith[n_arith % len(arith)]] if kind == "arithmetic" and arith else []
        n_arith += kind == "arithmetic"
        rec = make_record(kind, pool, own, rng, f"{split}-{i:06d}", path_of, n_follow)
        if rec is None:
            rec = make_record("transcribe", pool, [], rng, f"{split}-{i:06d}", path_of, n_follow)
        out.append(rec)
    return out


def expected_arithmetic(n: int, seed: int, split: str, weights: dict[str, float] | None = None) -> int:
    """How many arithmetic records make_conversations will ask for (so that many clips get synthesised)."""
    return plan_types(n, weights or default_weights(split), seed, split).count("arithmetic")
