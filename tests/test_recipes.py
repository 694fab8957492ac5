"""The published-benchmark recipes (configs/recipes/): they parse, and rows with the schema of each source go
through the same loading (``datasets.load_dataset`` on the ``hub:``/``path:`` source), templating, label words
and metric as the real data would. Nothing is downloaded: every source is replaced by a local copy written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from datasets import ClassLabel, Dataset, Features, Value
from fit_runs import CONFIGS, print_config

from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.data.tokenizer import byte_tokenizer
from crma_lightning.evaluation import scoring
from crma_lightning.metrics.task import as_task_metric, cut_at_stop, row_scores

RECIPES = CONFIGS / "recipes"
# O-LoRA's three task orders (its scripts/order_{1,2,3}.sh at github.com/cmnfriend/O-LoRA 07117e1).
OLORA_ORDERS = {
    "olora_standard_cl.yaml": ["dbpedia", "amazon", "yahoo", "agnews"],
    "olora_standard_cl_order2.yaml": ["dbpedia", "amazon", "agnews", "yahoo"],
    "olora_standard_cl_order3.yaml": ["yahoo", "amazon", "agnews", "dbpedia"],
}
TRACE_ORDER = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]

# The sources' schemas (their dataset cards; O-LoRA's and TRACE's JSON files): the synthetic rows have exactly these.
HUB_FEATURES = {
    "fancyzhx/ag_news": Features(
        {"text": Value("string"), "label": ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])}
    ),
    "fancyzhx/dbpedia_14": Features(
        {
            "label": ClassLabel(
                names=[
                    "Company",
                    "EducationalInstitution",
                    "Artist",
                    "Athlete",
                    "OfficeHolder",
                    "MeanOfTransportation",
                    "Building",
                    "NaturalPlace",
                    "Village",
                    "Animal",
                    "Plant",
                    "Album",
                    "Film",
                    "WrittenWork",
                ]
            ),
            "title": Value("string"),
            "content": Value("string"),
        }
    ),
    "community-datasets/yahoo_answers_topics": Features(
        {
            "id": Value("int32"),
            "topic": ClassLabel(num_classes=10),
            "question_title": Value("string"),
            "question_content": Value("string"),
            "best_answer": Value("string"),
        }
    ),
}


def _hub_rows(features: Features, n: int, offset: int) -> dict[str, list]:
    rows: dict[str, list] = {}
    for column, feature in features.items():
        if isinstance(feature, ClassLabel):
            rows[column] = [(offset + i) % feature.num_classes for i in range(n)]
        elif feature.dtype == "int32":
            rows[column] = [offset + i for i in range(n)]
        else:
            rows[column] = [f"{column} {offset + i}" for i in range(n)]
    return rows


def _local_source(domain: dict, root: Path) -> tuple[dict, list[dict]]:
    """``domain`` with its source replaced by synthetic local rows of the same schema; the held-out rows."""
    local = dict(domain)
    folder = root / domain["name"]
    folder.mkdir()
    if "hub" in domain:
        features = HUB_FEATURES[domain["hub"]]
        for split, n, offset in (("train", 6, 0), ("test", 4, 100)):
            ds = Dataset.from_dict(_hub_rows(features, n, offset), features=features)
            ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))  # the Hub's parquet layout
        local.update(hub=str(folder), hub_config=None, revision=None)
        return local, Dataset.from_dict(_hub_rows(features, 4, 100), features=features).to_list()
    fields = ("prompt", "answer") if domain.get("prompt_field") == "prompt" else ("sentence", "label")
    labels = (domain.get("metric") or {}).get("labels")
    files = {}
    for split, n, offset in (("train", 6, 0), ("test", 4, 100)):
        rows = [
            # A free-text answer spans lines: its reference is cut at the metric's stop ("\n\n" for ROUGE-L).
            {fields[0]: f"{fields[0]} {offset + i}\n", fields[1]: labels[i % len(labels)] if labels else f"A{i}\nB{i}"}
            for i in range(n)
        ]
        files[split] = folder / f"{split}.json"
        files[split].write_text(json.dumps(rows))  # a JSON array, as O-LoRA and TRACE ship them
    local.update(path=str(files["train"]), holdout_path=str(files["test"]))
    return local, json.loads(files["test"].read_text())


def _expected(domain: dict, row: dict) -> tuple[str, str]:
    """(prompt, reference) of one held-out row, computed here from the recipe's fields."""
    template = domain.get("template")
    prompt = template.format(**row) if template is not None else row[domain["prompt_field"]]
    response = row[domain["response_field"]]
    if domain.get("response_labels"):
        response = domain["response_labels"][response]
    return prompt, cut_at_stop(response, as_task_metric(domain["metric"], domain["name"]).stop)


def _recipe(name: str) -> dict:
    return yaml.safe_load(print_config("--config", str(CONFIGS / "demo.yaml"), "--config", str(RECIPES / name)))


@pytest.mark.parametrize("name", [*OLORA_ORDERS, "trace.yaml"])
def test_recipe_rows_go_through_loading_templating_and_the_metric(name, tmp_path):
    cfg = _recipe(name)
    domains = cfg["data"]["domains"]
    assert [d["name"] for d in domains] == OLORA_ORDERS.get(name, TRACE_ORDER)
    for d in domains:  # the papers' own files (O-LoRA's class-balanced CL_Benchmark rows, TRACE's), no Hub split
        assert "hub" not in d and d["path"].endswith("/train.json") and d["holdout_path"].endswith("/test.json")
        if name in OLORA_ORDERS:  # O-LoRA's prompt ends "\nAnswer:" and the label word follows directly
            assert d["template"].endswith("\n{sentence}\nAnswer:") and "response_labels" not in d, d["name"]
    local, held = zip(*(_local_source(d, tmp_path) for d in domains))
    dm = SequentialDomainDataModule(
        domains=list(local), max_length=cfg["data"]["max_length"], packing=False, batch_size=2
    )
    tok = byte_tokenizer()
    dm.prepare(tok)
    for domain, rows in zip(domains, held):
        expected = {_expected(domain, row) for row in rows}
        scored = dm.score_rows[domain["name"]]
        assert len(scored) == len(rows)
        got = {(tok.decode(r["prompt_ids"]), r["reference"]) for r in scored}
        assert got == expected, domain["name"]
        metric = as_task_metric(domain["metric"], domain["name"])
        refs = [r["reference"] for r in scored]
        assert row_scores(metric, refs, refs) == [1.0] * len(refs)  # the reference itself scores 1
        assert row_scores(metric, ["zzz"] * len(refs), refs) != [1.0] * len(refs)
        if metric.name == "accuracy":  # every label word the rows can produce is a label of the metric
            assert set(domain.get("response_labels") or metric.labels) == set(metric.labels)


def test_a_recipe_domain_is_scored_by_generation_with_a_tiny_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    domain = _recipe("olora_standard_cl.yaml")["data"]["domains"][0]
    local, _ = _local_source(domain, tmp_path)
    dm = SequentialDomainDataModule(domains=[local], max_length=512, packing=False, batch_size=2)
    tok = byte_tokenizer()
    dm.prepare(tok)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    metric = as_task_metric({**domain["metric"], "max_new_tokens": 2}, domain["name"])
    total, count = scoring.domain_score_sums(model, tok, metric, dm.score_rows["dbpedia"], torch.device("cpu"), 4)
    assert count == 4 and 0.0 <= total <= count


def test_response_labels_map_class_indices_and_refuse_bad_ones(tmp_path):
    features = HUB_FEATURES["fancyzhx/ag_news"]
    Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 3, 1]}, features=features).to_parquet(
        str(tmp_path / "train-00000-of-00001.parquet")
    )
    words = ["World", "Sports", "Business", "Science or Technology"]
    spec = {"name": "news", "hub": str(tmp_path), "template": "{text} -> ", "response_field": "label"}
    dm = SequentialDomainDataModule(
        domains=[{**spec, "response_labels": words, "holdout_fraction": 0.34, "metric": "exact_match"}],
        max_length=64,
        packing=False,
        batch_size=1,
    )
    dm.prepare(byte_tokenizer())
    held = {(byte_tokenizer().decode(r["prompt_ids"]), r["reference"]) for r in dm.score_rows["news"]}
    assert held and held <= {("a -> ", "World"), ("b -> ", "Science or Technology"), ("c -> ", "Sports")}
    # A ClassLabel column's class count is checked right after loading: one word short fails in prepare.
    with pytest.raises(ValueError, match=r"response_labels has 3 words, but column 'label' has 4 classes"):
        SequentialDomainDataModule(
            domains=[{**spec, "response_labels": words[:3]}], max_length=64, packing=False, batch_size=1
        ).prepare(byte_tokenizer())
    plain = tmp_path / "plain"  # integers without ClassLabel features: an index out of range names the row
    plain.mkdir()
    Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 3, 1]}).to_parquet(
        str(plain / "train-00000-of-00001.parquet")
    )
    with pytest.raises(ValueError, match=r"field 'label' is 3, expected a class index in \[0, 2\]"):
        SequentialDomainDataModule(
            domains=[{**spec, "hub": str(plain), "response_labels": words[:3]}],
            max_length=64,
            packing=False,
            batch_size=1,
        ).prepare(byte_tokenizer())
    metric = {"name": "accuracy", "labels": words[:3]}  # "Science or Technology" could never score
    with pytest.raises(
        ValueError, match=r"response_labels \['Science or Technology'\] are not in the accuracy metric's labels"
    ):
        SequentialDomainDataModule(domains=[{**spec, "response_labels": words, "metric": metric}])
    with pytest.raises(ValueError, match=r"response_labels needs a response_field"):
        SequentialDomainDataModule(domains=[{"name": "x", "hub": str(tmp_path), "response_labels": words}])
    with pytest.raises(ValueError, match=r"response_labels=\['a', 'a'\] is invalid"):
        SequentialDomainDataModule(domains=[{**spec, "response_labels": ["a", "a"]}])
