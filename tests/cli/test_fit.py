"""The `crma-lightning` command: end to end, print_config round trip, bad keys/types, every shipped config."""

from __future__ import annotations

import json

import pytest
import yaml
from fit_runs import CONFIGS, ROOT, print_config, run_cli, tiny_config

from crma_lightning.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

OVERLAYS = {"naive.yaml", "frozen.yaml", "modular.yaml", "crma-shared.yaml"}
OVERLAYS |= {"replay.yaml", "ewc.yaml", "olora.yaml", "routing.yaml"}  # continual methods, routing


def test_cli_end_to_end(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(tiny_config(tmp_path, run_dir)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 1/2: prose (" in proc.stdout and "stage 2/2: arithmetic (" in proc.stdout
    assert "trainable parameters of" in proc.stdout  # the one-line model summary
    # Quiet by default: none of the libraries' lines that are the same on every command.
    for noise in ("Seed set to", "litlogger", "Total FLOPs", "`Trainer.fit` stopped"):
        assert noise not in proc.stdout + proc.stderr, noise
    # The resolved domain list, with each domain's row type, is printed before training starts.
    assert "1. prose: built-in domain 'prose', text rows" in proc.stdout
    assert proc.stdout.index("2. arithmetic: built-in domain 'arithmetic', text rows") < proc.stdout.index("stage 1/2")
    assert "| after stage | prose | arithmetic |" in proc.stdout  # the report table is printed
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "complete" and len(report["loss_matrix"]["values"]) == 3
    adapted = report["config"]["model"]["adapted_modules"]
    assert adapted["lora_targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(adapted["lora"]) == 2 * 7 and len(adapted["crma"]) == 2  # 2 decoder layers
    assert (run_dir / "report.md").read_text().count("| base |") == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["init_args"]["adapter"] == "crma"
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "grad/norm", "val/prose/loss", "cl/drift_mean", "crma/spectral_norm_max"} <= tags
    assert "cl/loss_matrix" in events.Tags()["images"]
    # HParams tab: the settings with the run's final numbers, once per run.
    from tensorboard.plugins.hparams import plugin_data_pb2

    plugin = events.PluginTagToContent("hparams")
    starts = [plugin_data_pb2.HParamsPluginData.FromString(v) for v in plugin.values()]
    session = [d.session_start_info for d in starts if d.HasField("session_start_info")]
    assert len(session) == 1
    hp = session[0].hparams
    assert hp["adapter"].string_value == "crma" and hp["lora/r"].number_value == 8
    assert hp["data/domains"].string_value == "prose,arithmetic"
    # The budget, the sequence length and the learning rate the run trained with.
    assert hp["trainer/max_steps"].number_value == 3 and hp["data/max_length"].number_value == 32
    assert hp["optimizer/lr"].number_value == pytest.approx(1e-3) and "AdamW" in hp["optimizer/class"].string_value
    final = [e.value for e in events.Scalars("hp/drift_mean")]
    assert final == [pytest.approx(report["metrics"]["drift_mean"], rel=1e-5)]
    assert "hp/plasticity_mean" in set(events.Tags()["scalars"])


def test_library_noise_is_quiet_by_default_and_shown_with_crma_verbose(monkeypatch):
    import logging

    import lightning as L

    from crma_lightning.cli import run_with_exit_codes

    # A handler on Lightning's seed logger itself: whether its records reach the root logger (pytest's
    # caplog) depends on which test imported Lightning first, so caplog could see nothing either way.
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
    seed_logger.addHandler(handler)
    # setLevel, not a patched attribute: it also clears the loggers' isEnabledFor cache, which an
    # earlier test may have filled with "INFO is off" for this logger.
    old_level = seed_logger.level
    seed_logger.setLevel(logging.INFO)
    monkeypatch.setattr(seed_logger, "disabled", False)
    monkeypatch.setattr(logging.root.manager, "disable", logging.NOTSET)
    try:
        monkeypatch.delenv("CRMA_VERBOSE", raising=False)
        run_with_exit_codes(lambda args: L.seed_everything(3), [])
        assert not any("Seed set to 3" in m for m in seen), seen
        monkeypatch.setenv("CRMA_VERBOSE", "1")
        run_with_exit_codes(lambda args: L.seed_everything(4), [])
        assert any("Seed set to 4" in m for m in seen), seen
    finally:
        seed_logger.removeHandler(handler)
        seed_logger.setLevel(old_level)
    monkeypatch.delenv("CRMA_VERBOSE")
    run_with_exit_codes(lambda args: None, [])  # quiet again for the tests that follow


def test_print_config_round_trip(tmp_path):
    overrides = ["--model.init_args.adapter=lora", "--data.batch_size=4"]
    first = print_config("--config", str(CONFIGS / "demo.yaml"), *overrides)
    saved = tmp_path / "printed.yaml"
    saved.write_text(first)
    second = print_config("--config", str(saved))
    assert yaml.safe_load(first) == yaml.safe_load(second)
    cfg = yaml.safe_load(second)
    assert cfg["model"]["init_args"]["adapter"] == "lora" and cfg["data"]["batch_size"] == 4


def test_overlays_change_only_the_mode():
    base = yaml.safe_load(print_config("--config", str(CONFIGS / "demo.yaml")))
    for name in sorted(OVERLAYS):
        cfg = yaml.safe_load(print_config("--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / name)))
        before, after = base["model"]["init_args"], cfg["model"]["init_args"]
        differences = {f"model.{k}" for k in before if before[k] != after[k]}
        differences |= {f"run.{k}" for k in base["run"] if base["run"][k] != cfg["run"][k]}
        assert differences <= {"model.adapter", "model.task_adapters", "model.method", "run.dir"}, (name, differences)


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_parses(path):
    args = ["--config", str(CONFIGS / "demo.yaml")] if path in OVERLAYS else []
    cfg = yaml.safe_load(print_config(*args, "--config", str(CONFIGS / path)))
    assert cfg["model"]["class_path"].endswith("ContinualLM") or "class_path" in cfg["model"]


FIRST_DOMAINS = [
    {"name": "qa", "path": "qa.jsonl", "prompt_field": "question", "response_field": "answer"},
    {"name": "logs", "builtin": "code", "max_steps": 7},
]
LATER_DOMAINS = [{"name": "logs_pq", "path": "logs.parquet"}, {"name": "logs_ds", "hub": "./saved"}]


def test_a_later_yaml_domain_list_replaces_the_earlier_one_whole(tmp_path):
    """Same length as the earlier list: not merged entry by entry (no inherited prompt_field, no two sources)."""
    first, later = tmp_path / "first.yaml", tmp_path / "later.yaml"
    first.write_text(yaml.safe_dump({"data": {"domains": FIRST_DOMAINS}}))
    later.write_text(yaml.safe_dump({"data": {"domains": LATER_DOMAINS}}))
    cfg = yaml.safe_load(
        print_config("--config", str(CONFIGS / "demo.yaml"), "--config", str(first), "--config", str(later))
    )
    assert cfg["data"]["domains"] == LATER_DOMAINS


def test_a_command_line_domain_list_replaces_the_configs_whole(tmp_path):
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump({"data": {"domains": FIRST_DOMAINS}}))
    given = "[{name: logs_pq, path: logs.parquet}, {name: logs_ds, hub: ./saved}]"
    cfg = yaml.safe_load(print_config("--config", str(first), f"--data.domains={given}"))
    assert cfg["data"]["domains"] == LATER_DOMAINS
    cfg = yaml.safe_load(print_config("--config", str(first), "--data.domains=[prose, code]"))
    assert cfg["data"]["domains"] == ["prose", "code"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.init_args.adaptor=lora", "adaptor"),
        ("--model.init_args.adapter=crmaa", "crmaa"),
        ("--data.domains=[{name: m, pth: x.jsonl}]", "domain 'm' has unknown keys ['pth']"),
        ("--data.domains=[{name: m, builtin: prose, max_steps: many}]", "domain 'm': max_steps='many' is invalid"),
        ("--data.batch_size=eight", "batch_size"),
        ("--run.dirr=x", "dirr"),
    ],
)
def test_bad_keys_and_types_fail_fast(tmp_path, override, message):
    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(tiny_config(tmp_path, run_dir)), override)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not run_dir.exists(), "a configuration error must not leave a run directory behind"


def test_bad_values_fail_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(tmp_path, run_dir)
    proc = run_cli("fit", "--config", str(cfg), "--model.init_args.lora.r=0")
    assert proc.returncode == 2 and "rank r=0" in proc.stderr
    proc = run_cli("fit", "--config", str(cfg), "--trainer.max_steps=-3")
    assert proc.returncode == 2 and "max_steps" in proc.stderr and "-3" in proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.init_args.crma.g_max=-1", "CRMA g_max=-1"),
        ("--model.init_args.crma.n_streams=0", "CRMA n_streams=0"),
        ("--model.init_args.lora.r=0", "LoRA rank r=0"),
        ("--model.init_args.task_adapters=per_domain", "task_adapters\": Expected a typing.Literal"),
    ],
)
def test_config_errors_exit_2_before_any_model_loads(tmp_path, monkeypatch, capsys, override, message):
    """Adapter configs check themselves when built: the base model is never loaded for a bad field."""
    from crma_lightning.model import continual_lm

    loaded = []
    monkeypatch.setattr(continual_lm, "build_model", lambda *a, **k: loaded.append(a) or pytest.fail("model built"))
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tiny_config(tmp_path, run_dir)), "--model.init_args.adapter=crma", override])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert loaded == [] and not run_dir.exists()


def test_configuration_doc_lists_every_option():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    cfg = yaml.safe_load(print_config("--config", str(CONFIGS / "demo.yaml")))
    keys = []

    def walk(prefix, node):
        if isinstance(node, dict) and not {"class_path", "init_args"} <= set(node):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, dict):
            walk(prefix, node["init_args"])
        else:
            keys.append(prefix)

    for section in ("run", "data", "gradient_stability", "evaluation", "routing"):
        walk(section, cfg[section])
    walk("model", cfg["model"]["init_args"])
    keys = [k for k in keys if not k.startswith(("model.optimizer.", "model.model_config."))]
    missing = [k for k in keys if f"`{k.split('.', 1)[1]}`" not in doc and f"`{k}`" not in doc]
    assert not missing, f"docs/configuration.md does not document: {missing}"
