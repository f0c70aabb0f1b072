"""Tiny offline stand-ins: a BPE tokenizer, a 2-layer Qwen2, and TL;DR-shaped fixture data.

One place for what the tests and the offline `smoke` presets use instead of the Hub. The
tokenizer reproduces Qwen2.5's trap (pad == EOS == `<|endoftext|>`) so the tests prove we handle
it; the model has spare embedding rows past the vocabulary, as Qwen2.5 has (151,936 rows for
151,665 tokens), so `[PAD]` fits without a resize. The fixtures are generated deterministically
by `make_fixture_rows` and shipped in `fixtures/` (a test checks the two agree).

    python -m dgx_spark_summary_from_human_feedback.tiny    # rewrite fixtures/ and the tokenizer
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "tiny_tokenizer"
SFT_DIR = FIXTURES / "sft"  # train.jsonl, validation.jsonl, test.jsonl
COMPARISONS_FILE = FIXTURES / "comparisons.jsonl"
EOS = "<|endoftext|>"
VOCAB_SIZE = 1024  # upper bound; the fixture text yields 788 tokens
MODEL_VOCAB_ROWS = 832  # spare rows past the vocabulary (788 + [PAD]), like Qwen2.5


# ---------------------------------------------------------------------------------------------
# fixture text

SUBREDDITS = ["relationships", "AskReddit", "personalfinance", "tifu", "cooking"]
PEOPLE = [
    "my girlfriend",
    "my boyfriend",
    "my roommate",
    "my boss",
    "my sister",
    "my neighbour",
    "my best friend",
    "my dad",
]
THINGS = [
    "car",
    "apartment",
    "dog",
    "savings",
    "birthday cake",
    "laptop",
    "garden",
    "wedding",
    "job offer",
    "credit card",
]
FEELINGS = ["angry", "confused", "worried", "embarrassed", "happy", "stressed", "guilty", "relieved"]
ACTIONS = ["forgot about", "broke", "sold", "lost", "cooked", "borrowed", "fixed", "painted", "cancelled", "found"]
FILLER = [
    "It all started last week when the weather turned cold.",
    "I have never been in a situation like this before.",
    "We talked about it for hours but nothing changed.",
    "Everyone around me seems to have an opinion about it.",
    "I tried to stay calm and think it through.",
    "Some background: we have known each other for years.",
    "The money part is what worries me the most.",
    "Honestly I do not know what the right move is here.",
]
BAD_SUMMARIES = [
    " lol idk whatever",
    " stuff happened lol",
    " idk lol lol",
    " whatever man, stuff and things",
    " lol stuff idk whatever",
]


def _post(rng: random.Random, person: str, action: str, thing: str, feeling: str, paragraphs: int) -> str:
    lines = [f"So {person} {action} my {thing} and I feel {feeling}."]
    for _ in range(paragraphs):
        lines.append(" ".join(rng.sample(FILLER, 3)))
    lines.append(f"What should I do about {person} and the {thing}?")
    return "\n\n".join(lines)


def _summary(person: str, action: str, thing: str, feeling: str) -> str:
    return f"{person} {action} my {thing}, I feel {feeling}. What do I do?"


def make_fixture_rows(seed: int = 0) -> tuple[dict[str, list[dict]], list[dict]]:
    """({split: SFT rows}, comparison rows), in the Hub schemas, with the edge cases tests need."""
    rng = random.Random(seed)
    sft = _fixture_posts(rng)
    return sft, _fixture_comparisons(rng, sft)


def _fixture_posts(rng: random.Random) -> dict[str, list[dict]]:
    sft: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for split, n in (("train", 96), ("validation", 32), ("test", 16)):
        for i in range(n):
            person, action, thing, feeling = (rng.choice(words) for words in (PEOPLE, ACTIONS, THINGS, FEELINGS))
            sft[split].append(
                {
                    "id": f"{split}-{i:03d}",
                    "subreddit": SUBREDDITS[i % len(SUBREDDITS)],
                    "title": f"{person.capitalize()} {action} my {thing}",
                    "post": _post(rng, person, action, thing, feeling, rng.randint(1, 4)),
                    "summary": _summary(person, action, thing, feeling),
                }
            )
    # edge cases (train and validation): a long post with many newlines, a long post with no
    # newline, a title too long for the budget, Unicode and emoji, a summary over the cap
    for split in ("train", "validation"):
        rows = sft[split]
        rows[1]["post"] = "\n".join(f"Paragraph {k}: " + " ".join(rng.sample(FILLER, 4)) for k in range(60))
        rows[2]["post"] = " ".join(rng.choice(FILLER) for _ in range(120))
        rows[3]["title"] = "A very long title " + " ".join(rng.choice(FILLER) for _ in range(100))
        rows[4]["post"] += "\n\nCafé, naïve, 日本語, Привет, مرحبا 🙂🎉👍🏽 — “quotes”."
        rows[4]["title"] += " 🙂"
        rows[5]["summary"] = " ".join(rng.choice(FILLER) for _ in range(12))
    return sft


def _fixture_comparisons(rng: random.Random, sft: dict[str, list[dict]]) -> list[dict]:
    comparisons: list[dict] = []
    # comparisons: the chosen summary names the post's people and things, the rejected one is
    # filler ("lol idk"), so a tiny reward model can learn the preference in seconds
    for k, row in enumerate(sft["train"] + sft["validation"][:24]):
        split = "train" if row["id"].startswith("train") else ("valid1" if k % 2 else "valid2")
        good = " " + row["summary"]
        bad = rng.choice(BAD_SUMMARIES)
        choice = rng.randint(0, 1)
        summaries = [{"text": good, "policy": "sup2", "note": None}, {"text": bad, "policy": "sup1", "note": None}]
        if choice == 1:
            summaries.reverse()
        comparisons.append(
            {
                "info": {
                    "id": row["id"],
                    "post": row["post"],
                    "title": row["title"],
                    "subreddit": row["subreddit"],
                    "site": None,
                    "article": None,
                },
                "summaries": summaries,
                "choice": choice,
                "worker": f"worker{k % 7}",
                "batch": f"batch{3 + k % 4}",
                "split": split,
                "extra": {"confidence": (k % 9) + 1 if k % 5 else None},
            }
        )
    for k in range(6):  # out-of-distribution CNN/DM articles -> validation_cnndm
        person, thing = rng.choice(PEOPLE), rng.choice(THINGS)
        article = "\n".join(rng.sample(FILLER, 5)) + f"\nOfficials said {person} {rng.choice(ACTIONS)} the {thing}."
        choice = rng.randint(0, 1)
        summaries = [
            {"text": f" Officials said {person} and the {thing} made news.", "policy": "ref", "note": None},
            {"text": rng.choice(BAD_SUMMARIES), "policy": "sup1", "note": None},
        ]
        if choice == 1:
            summaries.reverse()
        comparisons.append(
            {
                "info": {
                    "id": f"cnndm-{k}",
                    "post": None,
                    "title": None,
                    "subreddit": None,
                    "site": "dailymail",
                    "article": article,
                },
                "summaries": summaries,
                "choice": choice,
                "worker": "worker9",
                "batch": "cnndm0",
                "split": "valid2",
                "extra": {"confidence": None},
            }
        )
    return comparisons


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def fixture_texts() -> dict[str, str]:
    """{relative path: file content} of the fixture data, as shipped in fixtures/."""
    sft, comparisons = make_fixture_rows()
    files = {f"sft/{split}.jsonl": _jsonl(rows) for split, rows in sft.items()}
    files["comparisons.jsonl"] = _jsonl(comparisons)
    return files


# ---------------------------------------------------------------------------------------------
# tokenizer and model


def build_tokenizer(output_dir: str | Path) -> None:
    """Train a byte-level BPE on the fixture text and save it with Qwen2.5's pad == EOS trap."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sft, comparisons = make_fixture_rows()
    corpus = [r[k] for rows in sft.values() for r in rows for k in ("subreddit", "title", "post", "summary")]
    corpus += [s["text"] for c in comparisons for s in c["summaries"]] + [
        c["info"]["article"] or "" for c in comparisons
    ]
    corpus += ["SUBREDDIT: r/\n\nTITLE: \n\nPOST: \n\nTL;DR:", "Article:\n\n\nTL;DR:"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)  # the Qwen2.5 trap
    tokenizer.save_pretrained(str(output_dir))


def model_config(vocab_rows: int = MODEL_VOCAB_ROWS, **overrides):
    """A 2-layer Qwen2 config shaped like Qwen2.5 (GQA, tied embeddings), hidden 64."""
    from transformers import Qwen2Config

    kwargs = dict(
        vocab_size=vocab_rows,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,  # <|endoftext|> is the first token the BPE trainer adds
        pad_token_id=None,
    )
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def write_model(output_dir: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Qwen2 causal LM with the fixture tokenizer (with [PAD])."""
    import torch
    from transformers import AutoModelForCausalLM

    from .data import load_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config())
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    return Path(output_dir)


if __name__ == "__main__":
    for rel, text in fixture_texts().items():
        (FIXTURES / rel).parent.mkdir(parents=True, exist_ok=True)
        (FIXTURES / rel).write_text(text)
    build_tokenizer(TOKENIZER_DIR)
    print(f"wrote {FIXTURES}")
