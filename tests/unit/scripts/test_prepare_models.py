"""scripts/prepare_models.py's tiny BERT classifier, built into a temporary folder (a few
seconds, no model hub): a BertForSequenceClassification with three labels, a WordPiece
tokenizer that loads offline, labels that vary from text to text, a build that is reused, and
builds that are byte-identical."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts import prepare_models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")

TEXTS = [
    "Invoice #1234 was charged twice, please refund the second payment.",
    "The API is down since 9am and every request times out.",
    "Hello, world! How are you today?",
    "What is the capital of France?",
    "Please cancel my subscription and refund the last payment.",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The model, built once for the module; everything offline (no hub lookups)."""
    base = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DOCQUEUE_MODEL_DIR", raising=False)
        for var in OFFLINE:  # set here, so the build's setdefault leaves no trace after
            mp.setenv(var, "1")
        yield prepare_models.ensure_tiny_bert_classifier(base)


def test_layout_and_config(built: Path) -> None:
    assert built == prepare_models.tiny_bert_classifier_path(built.parent)
    assert built.name == "tiny-bert-classifier"
    assert prepare_models.is_ready(built, prepare_models.TINY_BERT_VERSION)
    assert (built / "model.safetensors").is_file()
    config = transformers.AutoConfig.from_pretrained(str(built))
    assert config.architectures == ["BertForSequenceClassification"]
    assert config.id2label == {0: "billing", 1: "outage", 2: "other"}
    assert config.label2id == {"billing": 0, "outage": 1, "other": 2}
    assert config.num_labels == 3
    assert config.problem_type == "single_label_classification"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 64, 2)
    assert config.max_position_embeddings == 512


def test_tokenizer_loads_offline(built: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(built), local_files_only=True)
    assert tok.model_max_length == 512
    for name, token, token_id in [
        ("pad", "[PAD]", 0),
        ("unk", "[UNK]", 1),
        ("cls", "[CLS]", 2),
        ("sep", "[SEP]", 3),
        ("mask", "[MASK]", 4),
    ]:
        assert getattr(tok, f"{name}_token") == token
        assert tok.convert_tokens_to_ids(token) == token_id
    ids = tok("The server is down in Berlin!")["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert "[UNK]" not in tokens and "server" in tokens  # lower-cased WordPiece on the corpus
    assert tok.decode(ids, skip_special_tokens=True) == "the server is down in berlin!"
    assert len(tok) == transformers.AutoConfig.from_pretrained(str(built)).vocab_size


def test_labels_vary_across_texts(built: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(built))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(built)).eval()
    assert type(model).__name__ == "BertForSequenceClassification"
    with torch.no_grad():
        logits = model(**tok(TEXTS, padding=True, return_tensors="pt")).logits
    assert logits.shape == (len(TEXTS), 3)
    probs = logits.softmax(dim=-1)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(len(TEXTS)))
    # Not one label for everything, and not nearly the same scores for every text.
    assert len(set(probs.argmax(dim=-1).tolist())) >= 2
    assert (probs.max(dim=0).values - probs.min(dim=0).values).min() > 0.05
    # Padding does not change a text's scores.
    with torch.no_grad():
        alone = model(**tok(TEXTS[2], return_tensors="pt")).logits
    assert torch.allclose(alone[0], logits[2], atol=1e-4)


def test_second_ensure_reuses_the_build(built: Path) -> None:
    marker = built / prepare_models.MARKER
    before = marker.stat().st_mtime_ns
    assert prepare_models.ensure_tiny_bert_classifier(built.parent) == built
    assert marker.stat().st_mtime_ns == before
    assert prepare_models.main(["tiny-bert", "--model-dir", str(built.parent)]) == 0
    assert marker.stat().st_mtime_ns == before
    assert not list(built.parent.glob(".tiny-bert-classifier.build-*"))  # no build left over


def test_build_is_deterministic(built: Path, tmp_path: Path) -> None:
    """Another build gives the same files, byte for byte (the WordPiece trainer would not,
    left to itself: it numbers characters in hash-map order)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in OFFLINE:
            mp.setenv(var, "1")
        again = prepare_models.ensure_tiny_bert_classifier(tmp_path)
    for name in ("tokenizer.json", "vocab.txt", "config.json", "model.safetensors"):
        assert (again / name).read_bytes() == (built / name).read_bytes(), name
