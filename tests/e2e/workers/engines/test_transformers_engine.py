"""`docqueue worker --engine transformers` through the real API: summarize and classify on the
tiny Llama, classify on a tiny BERT classifier (its own labels, no prompt). Greedy outputs equal
a plain ``model.generate`` on the same padded batches, and labels and confidences equal a direct
forward pass, computed here with transformers on the same prompts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.settings import Settings
from service.store.chunks import Doc
from tests.support.models import tiny_bert_model, tiny_model_alias
from tests.support.stack import job_results, new_key, post_job, running_worker, wait_job

pytestmark = pytest.mark.e2e
torch = pytest.importorskip("torch")

TEXTS = [
    "The invoice for March was charged twice and the customer wants a refund.",
    "Every request to the API times out since the deploy at noon.",
    "Thanks for the quick help yesterday!",
    "The login page shows an error after the password reset on every browser we tried.",
    "Please move my subscription to the yearly plan.",
    "Disk usage on the database host reached 95 percent overnight.",
    "Can I get a copy of last year's receipts?",
    "The mobile app crashes when I open the settings screen.",
]
BODY = "id,text\n" + "".join(f"d{i},{t}\n" for i, t in enumerate(TEXTS))
LLAMA_LABELS = ("billing", "outage", "other")


@pytest.fixture(scope="module")
def llama(
    settings: Settings, api_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    model = tiny_model_alias("transformers")  # its own queue: the session's vLLM worker stays off
    log = tmp_path_factory.mktemp("tf-llama") / "worker.log"
    with running_worker(settings, model, log, "--engine", "transformers"):
        yield model


@pytest.fixture(scope="module")
def bert(
    settings: Settings, api_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    model = tiny_bert_model()
    log = tmp_path_factory.mktemp("tf-bert") / "worker.log"
    with running_worker(settings, model, log, "--engine", "transformers"):
        yield model


def run_job(settings: Settings, api: str, **fields: Any) -> list[dict[str, Any]]:
    key = new_key(settings, api)
    job = post_job(api, key, BODY, id_column="id", **fields)
    assert wait_job(api, key, job["id"], timeout_s=240)["status"] == "completed"
    rows = job_results(api, key, job["id"])
    assert [r["id"] for r in rows] == [f"d{i}" for i in range(len(TEXTS))]
    assert all(r["error"] is None for r in rows), rows
    return rows


def test_summaries_equal_plain_generate_on_the_same_padded_batches(
    settings: Settings, api_server: str, llama: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.engines.transformers_engine import pad_rows, plan
    from workers.prompts import render

    rows = run_job(
        settings, api_server, task="summarize", model=llama, max_tokens=10, temperature=0,
        summary_words=20,
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(llama)
    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    params = {"summary_words": 20, "max_tokens": 10, "temperature": 0.0}
    prompts = [
        render(tok, "summarize", params, Doc(i + 1, f"d{i}", t, None), 10_000).token_ids
        for i, t in enumerate(TEXTS)
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    engine = settings.engine
    expected: dict[int, str] = {}
    groups = plan([len(p) for p in prompts], [10] * len(prompts),
                  engine.transformers_batch_tokens, engine.transformers_max_batch_rows)  # fmt: skip
    for group in groups:
        ids, mask = pad_rows([prompts[i] for i in group], pad)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                pad_token_id=pad,
            )  # fmt: skip
        for i, new in zip(group, out[:, ids.shape[1] :].tolist(), strict=True):
            expected[i] = str(tok.decode(new, skip_special_tokens=True))
    assert [r["output"] for r in rows] == [expected[i] for i in range(len(TEXTS))]
    assert all(r["completion_tokens"] == 10 for r in rows)


def test_classify_on_a_causal_model_scores_the_labels_as_a_direct_forward_pass_does(
    settings: Settings, api_server: str, llama: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.prompts import render

    rows = run_job(
        settings, api_server, task="classify", model=llama, labels=",".join(LLAMA_LABELS)
    )
    tok = AutoTokenizer.from_pretrained(llama)
    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    params = {"labels": list(LLAMA_LABELS)}
    for i, (text, row) in enumerate(zip(TEXTS, rows, strict=True)):
        prompt = render(tok, "classify", params, Doc(i + 1, f"d{i}", text, None), 10_000).token_ids
        scores = []
        for label in LLAMA_LABELS:
            cont = [*tok(label, add_special_tokens=False).input_ids, tok.eos_token_id]
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([prompt + cont])).logits[0]
            logp = torch.log_softmax(logits.float(), dim=-1)
            scores.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(cont)))
        probs = torch.softmax(torch.tensor(scores), dim=0)
        best = int(torch.argmax(probs))
        assert row["label"] == LLAMA_LABELS[best]
        assert row["confidence"] == pytest.approx(float(probs[best]), abs=1e-4)


def test_an_encoder_classifier_serves_classify_with_its_own_labels(
    settings: Settings, api_server: str, bert: str
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from workers.prompts import encode_document

    key = new_key(settings, api_server)
    models = httpx.get(
        f"{api_server}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ).json()["data"]
    entry = next(m for m in models if m["id"] == bert)
    assert entry["tasks"] == ["classify"] and entry["labels"] == ["billing", "outage", "other"]
    refused = httpx.post(
        f"{api_server}/v1/jobs",
        headers={"Authorization": f"Bearer {key}"},
        data={"task": "summarize", "model": bert},
        files={"file": ("docs.csv", BODY.encode(), "text/csv")},
        timeout=30,
    )
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "task"

    rows = run_job(settings, api_server, task="classify", model=bert)  # no labels: its own
    tok = AutoTokenizer.from_pretrained(bert)
    model = AutoModelForSequenceClassification.from_pretrained(bert).eval()
    labels = [model.config.id2label[k] for k in sorted(model.config.id2label)]
    for i, (text, row) in enumerate(zip(TEXTS, rows, strict=True)):
        ids = encode_document(tok, Doc(i + 1, f"d{i}", text, None), 512).token_ids
        with torch.inference_mode():
            probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        best = int(torch.argmax(probs))
        assert row["label"] == labels[best]
        assert row["confidence"] == pytest.approx(float(probs[best]), abs=1e-5)
    assert len({r["label"] for r in rows}) > 1
