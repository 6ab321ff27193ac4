"""benchmarks/design_study.py: rows built from the study file, finished runs reused only for the same config, the
comparisons and the table, on fabricated runs (the training process is replaced); one real training run (slow)."""

import dataclasses
import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline_cases import tiny_pipeline
from unet_dcnv4.config import to_yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("design_study_script", ROOT / "benchmarks" / "design_study.py")
study_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study_script)

STUDY = {
    "base": {"model_size": "tiny", "resolution": 16, "max_train_steps": 4, "model_type": "dcnv4",
             "dcnv4_options": {"group_channels": 16}},
    "baseline": {"model_type": "conv"},
    "variants": {"default": {}, "gc8": {"dcnv4_options": {"group_channels": 8}},
                 "scaled": {"dcnv4_options": {"offset_scale": 0.5}, "recompute_value": True}},
}

_one_at_a_time = threading.Lock()


@pytest.fixture
def study_file(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    return path


def fake_train(cfg, output_dir, threads, prepare_only=False):
    """What train_ldm.py leaves behind for `cfg`, with an untrained tiny model of the config's options (the
    jobs run in threads, which share torch's random state: one at a time); with `prepare_only`, the call only."""
    from unet_dcnv4.training import unet_options
    from unet_dcnv4.unet import build_unet

    run = Path(cfg.output_dir)
    if prepare_only:
        fake_train.calls.append(("prepare", run.name, threads))
        return
    with _one_at_a_time:
        pipe = tiny_pipeline()
        torch.manual_seed(cfg.seed)
        pipe.register_modules(unet=build_unet(cfg.model_type, cfg.model_size, sample_size=8,
                                              **unet_options(cfg)).eval())
    pipe.save_pretrained(run / "pipeline")
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "train_stats.json").write_text(json.dumps({"steps": cfg.max_train_steps, "images_per_s": 10.0,
                                                      "wall_time_s": 1.0, "data_fingerprint": "data-0"}))
    fake_train.calls.append((run.parent.name, run.name, threads))


def test_rows_merge_dcnv4_options_over_the_base(study_file, tmp_path):
    study = study_script.read_study(study_file)
    cfg = study_script.run_config(study, "scaled", 1, tmp_path)
    assert cfg.dcnv4_options == {"group_channels": 16, "offset_scale": 0.5} and cfg.recompute_value
    assert cfg.seed == 1 and cfg.output_dir == str(tmp_path / "runs" / "scaled" / "seed1")
    conv = study_script.run_config(study, study_script.BASELINE, 0, tmp_path)
    assert conv.model_type == "conv" and conv.max_train_steps == 4
    assert study_script.changes(study, "scaled") == "recompute_value=True, offset_scale=0.5"
    assert study_script.changes(study, "default") == "(the base)"


@pytest.mark.parametrize("text,needle", [
    ("variants: {}\n", "non-empty 'variants'"),
    ("variants: {a: {}}\nextra: 1\n", "unknown keys ['extra']"),
    ("variants: {baseline: {}}\n", "'baseline' names the conv row"),
    ("variants: {a: {}}\ncurve_rows: [b]\n", "curve_rows names no variant ['b']"),
    ("variants: {a: {}}\ncurve_steps: [1000, -5]\n", "curve_steps must be a list of positive steps"),
    ("variants: {a: {}}\nconfirm: {base: {}}\n", "confirm must hold 'seeds'"),
    ("variants: {a: {}}\nconfirm: {seeds: [5], base: {model_type: conv}}\n", "confirm's base sets ['model_type']"),
    ("variants: {a: {learning_rate: 0.1}}\n", "row 'a' sets ['learning_rate'], which every run of a comparison"),
])
def test_bad_study_files_are_named(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        study_script.read_study(path)


def test_unknown_config_keys_and_rows_are_one_line_errors(study_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert study_script.main(["--study", str(study_file), "--output_dir", str(tmp_path), "--only", "nope"]) == 2
    assert "--only names rows the study does not have: ['nope']" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**STUDY, "base": {"learning_rat": 1.0}}))
    assert study_script.main(["--study", str(bad), "--output_dir", str(tmp_path)]) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_runs_are_reused_only_for_the_same_config(study_file, tmp_path, monkeypatch):
    study = study_script.read_study(study_file)
    cfg = study_script.run_config(study, "gc8", 0, tmp_path)
    assert study_script.run_state(cfg) == "new"
    fake_train.calls = []
    fake_train(cfg, tmp_path, 1)
    assert study_script.run_state(cfg) == "finished"
    stats = Path(cfg.output_dir) / "train_stats.json"
    stats.write_text(json.dumps({"steps": 2}))
    assert study_script.run_state(cfg) == "partial"  # interrupted: resumed, not redone
    # Bookkeeping does not matter; anything that changes the model or its training does.
    cfg.checkpointing_steps, cfg.log_every_steps = 1, 1
    assert study_script.run_state(cfg) == "partial"
    cfg.max_train_steps = 8  # a longer budget resumes the run
    assert study_script.run_state(cfg) == "partial"
    cfg.max_train_steps = 1
    with pytest.raises(FileExistsError, match="trained 2 steps, more than max_train_steps=1"):
        study_script.run_state(cfg)
    cfg.max_train_steps = 4
    for key, value in [("train_batch_size", 16), ("vae", "other/vae"), ("data_source", "other")]:
        changed = study_script.run_config(study, "gc8", 0, tmp_path)
        setattr(changed, key, value)
        with pytest.raises(FileExistsError, match=key):
            study_script.run_state(changed)
    cfg.dcnv4_options = {"group_channels": 4}
    with pytest.raises(FileExistsError, match=r"dcnv4_options: \{'group_channels': 8\} there, \{'group_channels': 4\}"):
        study_script.run_state(cfg)
    conv = study_script.run_config(study, study_script.BASELINE, 0, tmp_path)
    fake_train(conv, tmp_path, 1)
    conv.dcnv4_options = {"group_channels": 4}  # a conv run ignores them
    assert study_script.run_state(conv) == "finished"
    conv.model_size = "S"
    with pytest.raises(FileExistsError, match="model_size"):
        study_script.run_state(conv)
    monkeypatch.setattr(study_script, "train", fake_train)
    with pytest.raises(FileExistsError):
        study_script.train_all([cfg], tmp_path, jobs=1, overwrite=False)
    study_script.train_all([cfg], tmp_path, jobs=1, overwrite=True)
    assert study_script.run_state(cfg) == "finished"


def test_max_train_steps_sets_every_runs_budget(study_file, tmp_path, monkeypatch, capsys):
    fake_train.calls = []
    monkeypatch.setattr(study_script, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "longer"
    args = ["--study", str(study_file), "--output_dir", str(out), "--seeds", "0", "--only", "gc8", "--phases", "train"]
    assert study_script.main(args + ["--max_train_steps", "9"]) == 0
    for row in ("baseline", "gc8"):
        assert yaml.safe_load((out / "runs" / row / "seed0" / "config.yaml").read_text())["max_train_steps"] == 9
    assert study_script.main(args + ["--max_train_steps", "0"]) == 2
    assert "--max_train_steps must be >= 1, got 0" in capsys.readouterr().err


def test_the_latent_cache_is_built_first_only_while_no_run_has_checkpointed(study_file, tmp_path, monkeypatch):
    """Before any run has checkpointed, one process with every core builds the latent cache, then the runs train
    `jobs` at a time; runs that stopped part-way have built it: extending them starts `jobs` at a time at once."""
    fake_train.calls = []
    monkeypatch.setattr(study_script, "train", fake_train)
    study = study_script.read_study(study_file)
    configs = [study_script.run_config(study, row, 0, tmp_path) for row in ("baseline", "default")]
    for cfg in configs:  # started, no checkpoint yet: the cache may not exist
        Path(cfg.output_dir).mkdir(parents=True)
        (Path(cfg.output_dir) / "config.yaml").write_text(to_yaml(cfg))
    study_script.train_all(configs, tmp_path, jobs=2, overwrite=False)
    cores = study_script.os.cpu_count() or 1
    assert fake_train.calls[0] == ("prepare", "seed0", cores)
    assert sorted(call[:2] for call in fake_train.calls[1:]) == [("baseline", "seed0"), ("default", "seed0")]
    assert [call[2] for call in fake_train.calls[1:]] == [max(1, cores // 2)] * 2

    fake_train.calls = []
    longer = [dataclasses.replace(cfg, max_train_steps=cfg.max_train_steps * 2) for cfg in configs]
    for cfg in longer:  # finished at the shorter budget, checkpointed: partial now, and the cache exists
        assert study_script.run_state(cfg) == "partial"
        (Path(cfg.output_dir) / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    study_script.train_all(longer, tmp_path, jobs=2, overwrite=False)
    assert [call[2] for call in fake_train.calls] == [max(1, cores // 2)] * 2


def test_a_built_latent_cache_lets_new_runs_train_jobs_at_a_time(study_file, tmp_path, monkeypatch):
    """New runs whose shared latent cache is already built start `jobs` at a time; an unbuilt one is built first."""
    monkeypatch.setattr(study_script, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    study = study_script.read_study(study_file)
    configs = [dataclasses.replace(study_script.run_config(study, row, 0, tmp_path), latent_cache_dir="cache")
               for row in ("baseline", "default")]
    cores = study_script.os.cpu_count() or 1
    fake_train.calls = []
    (tmp_path / "cache").mkdir()  # a folder without an index is not a built cache
    study_script.train_all(configs, tmp_path, jobs=2, overwrite=False)
    assert [call[0] for call in fake_train.calls].count("prepare") == 1

    fresh = [dataclasses.replace(cfg, output_dir=cfg.output_dir + "-fresh") for cfg in configs]
    (tmp_path / "cache" / "cache.json").write_text("{}")
    fake_train.calls = []
    study_script.train_all(fresh, tmp_path, jobs=2, overwrite=False)
    assert "prepare" not in [call[0] for call in fake_train.calls]
    assert [call[2] for call in fake_train.calls] == [max(1, cores // 2)] * 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


def test_study_trains_what_is_missing_compares_each_row_and_writes_one_table(study_file, tmp_path, reference,
                                                                             monkeypatch, capsys):
    fake_train.calls = []
    monkeypatch.setattr(study_script, "train", fake_train)
    monkeypatch.chdir(tmp_path)  # main() moves to the repository root; restored after the test
    out = tmp_path / "study"
    common = ["--study", str(study_file), "--output_dir", str(out), "--jobs", "2", "--num_images", "4",
              "--num_inference_steps", "2", "--reference", reference, "--batch_size", "4", "--jackknife_groups", "3",
              "--warmup", "0", "--iters", "1"]
    assert study_script.main(common + ["--seeds", "0", "1", "--only", "default"]) == 0
    trained = sorted(call[:2] for call in fake_train.calls[1:])
    assert trained == sorted((row, f"seed{s}") for row in ("baseline", "default") for s in (0, 1))
    cores = study_script.os.cpu_count() or 1
    assert fake_train.calls[0] == ("prepare", "seed0", cores)  # the latent cache first, with every core

    summary = json.loads((out / "study.json").read_text())
    rows = {r["row"]: r for r in summary["rows"]}
    assert list(rows) == ["default", "baseline"]
    compared = json.loads((out / "comparisons" / "default" / "comparison.json").read_text())
    assert rows["default"]["fid_difference"] == compared["fid_difference"]["value"]
    assert rows["default"]["ci95"] == compared["fid_difference"]["ci95"]
    assert rows["default"]["verdict"] == compared["fid_difference"]["verdict"]
    assert rows["default"]["num_runs"] == rows["baseline"]["num_runs"] == 2
    assert rows["default"]["fid_std"] is not None and rows["baseline"]["fid_difference"] is None
    assert rows["default"]["train_images_per_s"] > 0 and rows["default"]["eval_images_ratio"] > 0
    assert rows["baseline"]["train_images_ratio"] == 1.0

    # Another row later (one seed here): finished runs are reused, earlier rows stay in the table, and an
    # unchanged comparison is not measured again.
    fake_train.calls = []
    capsys.readouterr()
    assert study_script.main(common + ["--seeds", "0", "--only", "gc8", "--phases", "train", "compare", "table"]) == 0
    assert [call[:2] for call in fake_train.calls] == [("gc8", "seed0")]
    assert fake_train.calls[0][2] == max(1, (study_script.os.cpu_count() or 1) // 2)  # the cache exists
    assert "baseline/seed0: finished, reused" in capsys.readouterr().out
    rows = [r["row"] for r in json.loads((out / "study.json").read_text())["rows"]]
    assert rows == ["default", "gc8", "baseline"]
    table = (out / "study.md").read_text()
    assert table.count("\n") == 7 and "| gc8 | group_channels=8 | (32, 64) |" in table
    assert "p (Holm, 2 rows)" in table and "Holm's correction across the 2 compared rows" in table
    assert study_script.main(common + ["--seeds", "0", "1", "--only", "default", "--phases", "compare"]) == 0
    assert "comparison default: unchanged, reused" in capsys.readouterr().out


@pytest.mark.slow
def test_a_real_run_trains_through_train_ldm(tmp_path):
    """The training process itself: a config file per run, a log, and a finished run that the next pass reuses."""
    study = {"base": {"max_train_steps": 2, "checkpointing_steps": 1, "sample_every_steps": 0, "train_batch_size": 4,
                      "lr_warmup_steps": 1, "latent_cache_dir": str(tmp_path / "latents")},
             "variants": {"default": {}}}
    cfg = study_script.run_config(study, "default", 0, tmp_path)
    study_script.train_all([cfg], tmp_path, jobs=1, overwrite=False)
    assert (tmp_path / "latents" / "cache.json").is_file()  # built by the prepare process, then trained on
    assert study_script.run_state(cfg) == "finished"
    assert (tmp_path / "configs" / "default.seed0.yaml").is_file()
    assert "steps" in (tmp_path / "runs" / "default" / "seed0.log").read_text()


def test_table_reports_p_values_and_which_verdicts_survive_holm():
    study = {"base": {}, "baseline": {"model_type": "conv"}, "variants": {r: {} for r in ("x", "y", "z")}}

    def summary(p_value, value):
        arm = {"label": "DCNv4", "block_out_channels": [32, 96], "parameters": 1, "parameter_ratio": 1.0, "gflops": 1,
               "gflops_ratio": 1.0, "num_runs": 3, "fid_mean": 200.0, "fid_std": 1.0, "kid_mean": 0.1, "kid_std": 0.01}
        difference = {"value": value, "ci95": [value - 1, value - 0.1], "df": 4.0, "p_value": p_value,
                      "method": "Welch's t interval on the per-run FIDs", "verdict": "DCNv4 lower FID"}
        return {"arms": [arm, {**arm, "label": "conv"}], "fid_difference": difference}

    rows, markdown = study_script.table(study, {"x": summary(0.01, -5), "y": summary(0.03, -4),
                                                "z": summary(0.04, -3)}, {})
    by_row = {r["row"]: r for r in rows}
    assert [by_row[r]["p_holm"] for r in "xyz"] == pytest.approx([0.03, 0.06, 0.06])
    assert by_row["x"]["verdict_holm"] == "DCNv4 lower FID"
    assert by_row["y"]["verdict_holm"] == by_row["z"]["verdict_holm"] == "no significant difference at 95%"
    assert "| 0.03 | DCNv4 lower FID | DCNv4 lower FID |" in markdown
    assert "| 0.06 | DCNv4 lower FID | no significant difference at 95% |" in markdown


def test_runs_train_seed_by_seed_with_the_threads_asked_for(study_file, tmp_path, monkeypatch):
    fake_train.calls = []
    monkeypatch.setattr(study_script, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    argv = ["--study", str(study_file), "--output_dir", str(tmp_path / "study"), "--only", "default", "gc8",
            "--seeds", "0", "1", "--jobs", "1", "--threads", "1", "--phases", "train"]
    assert study_script.main(argv) == 0
    assert fake_train.calls == [("prepare", "seed0", study_script.os.cpu_count() or 1)] + [
        (row, f"seed{s}", 1) for s in (0, 1) for row in ("baseline", "default", "gc8")]
    assert study_script.main(argv[:-6] + ["--threads", "0", "--phases", "train"]) == 2


def test_select_row_prefers_rows_that_survive_holm():
    def row(name, fid, diff, verdict_holm):
        return {"row": name, "changes": name, "fid_mean": fid, "fid_difference": diff, "ci95": [diff - 1, diff + 1],
                "p_value": 0.01, "p_holm": 0.02, "verdict_holm": verdict_holm}

    nothing = "no significant difference at 95%"
    rows = [row("a", 200.0, -9.0, nothing), row("b", 203.0, -6.0, "DCNv4 lower FID"), row("c", 220.0, 8.0, nothing)]
    chosen = study_script.select_row(rows)
    assert chosen["row"] == "b" and chosen["survived_holm"] and chosen["rule"].startswith("lowest mean FID among")
    chosen = study_script.select_row([rows[0], rows[2]])
    assert chosen["row"] == "a" and not chosen["survived_holm"] and chosen["rule"].startswith("no row beat conv")
    with pytest.raises(ValueError, match="no compared row"):
        study_script.select_row([])


def test_select_then_confirm_on_other_data_with_fresh_seeds(tmp_path, reference, monkeypatch, capsys):
    fake_train.calls = []
    monkeypatch.setattr(study_script, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    study = {**STUDY, "curve_steps": [4],
             "confirm": {"seeds": [7, 8], "base": {"data_source": "other_images"}, "reference": reference}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "study"
    common = ["--study", str(path), "--output_dir", str(out), "--num_images", "4", "--num_inference_steps", "2",
              "--reference", reference, "--batch_size", "4", "--jackknife_groups", "3", "--seeds", "0", "1",
              "--only", "default", "gc8"]
    assert study_script.main(common + ["--phases", "train", "compare", "table", "select", "confirm"]) == 0
    selected = json.loads((out / "selected.json").read_text())
    assert selected["row"] in ("default", "gc8") and selected["seeds"] == [0, 1]
    confirmed = sorted(call[:2] for call in fake_train.calls if call[1] in ("seed7", "seed8") and call[0] != "prepare")
    assert confirmed == sorted((r, f"seed{s}") for r in ("baseline", selected["row"]) for s in (7, 8))
    config = yaml.safe_load((out / "confirm" / "runs" / selected["row"] / "seed7" / "config.yaml").read_text())
    assert config["data_source"] == "other_images"
    text = (out / "confirm" / "confirmation.md").read_text()
    assert f"Confirmation of row {selected['row']!r}" in text and "fresh seeds [7, 8]" in text
    assert json.loads((out / "confirm" / "confirmation.json").read_text())["fid_difference"]["method"].startswith(
        "Welch's t")
    # The confirmation measures the FID curve at the study's steps: it is the second domain's curves too.
    key = json.loads((out / "confirm" / "comparisons" / selected["row"] / "study_key.json").read_text())
    assert key["curve"] is True and key["curve_steps"] == [4]
    # Seeds of the selection are not fresh.
    study["confirm"]["seeds"] = [1, 9]
    path.write_text(yaml.safe_dump(study))
    assert study_script.main(common + ["--phases", "confirm"]) == 2
    assert "repeat the selection's seeds" in capsys.readouterr().err


def test_confirm_row_confirms_a_named_row_without_a_select_phase(tmp_path, reference, monkeypatch, capsys):
    fake_train.calls = []
    monkeypatch.setattr(study_script, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    study = {**STUDY, "curve_steps": [4], "confirm": {"seeds": [7], "base": {"data_source": "other_images"},
                                                      "reference": reference}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "study"
    common = ["--study", str(path), "--output_dir", str(out), "--num_images", "4", "--num_inference_steps", "2",
              "--batch_size", "4", "--jackknife_groups", "3", "--seeds", "0", "1"]
    assert study_script.main(common + ["--phases", "confirm", "--confirm_row", "gc8"]) == 0
    assert not (out / "selected.json").exists()
    assert sorted(call[:2] for call in fake_train.calls) == [("baseline", "seed7"), ("gc8", "seed7"), ("prepare", "seed7")]
    text = (out / "confirm" / "confirmation.md").read_text()
    assert "Confirmation of row 'gc8' (group_channels=8)" in text and "named with --confirm_row" in text
    confirmation = json.loads((out / "confirm" / "confirmation.json").read_text())
    assert confirmation["selected"]["row"] == "gc8" and confirmation["selected"]["seeds"] == [0, 1]
    # The speed at matched parameters, timed here: the row's first seed against conv's.
    assert confirmation["throughput"]["train_images_ratio"] > 0 and confirmation["throughput"]["eval_images_per_s"] > 0
    assert f"training {confirmation['throughput']['train_images_ratio']:.2f}x conv's images/s" in text
    # A row the study lacks, or a select phase beside it, is refused before anything trains.
    fake_train.calls = []
    assert study_script.main(common + ["--phases", "confirm", "--confirm_row", "nope"]) == 2
    assert "--confirm_row names no row of the study: 'nope'" in capsys.readouterr().err
    assert study_script.main(common + ["--phases", "select", "confirm", "--confirm_row", "gc8"]) == 2
    assert "leave select out of --phases" in capsys.readouterr().err
    # Without it and without a select phase's choice, the confirm phase says how to name one.
    assert study_script.main(common + ["--phases", "confirm"]) == 2
    assert "name the row with --confirm_row" in capsys.readouterr().err
    assert fake_train.calls == []


def test_confirm_pool_trains_only_the_seeds_measured_nowhere_and_pools_them(tmp_path, reference, monkeypatch,
                                                                           capsys):
    """Seeds 7 and 8 confirmed on one machine, the study's four confirm seeds on another with their comparison
    pooled: only 9 and 10 train there, and the confirmation holds all four."""
    fake_train.calls = []
    monkeypatch.setattr(study_script, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    study = {**STUDY, "curve_steps": [4], "confirm": {"seeds": [7, 8], "base": {"data_source": "other_images"},
                                                      "reference": reference}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    common = ["--study", str(path), "--num_images", "4", "--num_inference_steps", "2", "--batch_size", "4",
              "--jackknife_groups", "3", "--seeds", "0", "1", "--phases", "confirm", "--confirm_row", "gc8"]
    assert study_script.main(common + ["--output_dir", str(tmp_path / "first")]) == 0
    earlier = tmp_path / "first" / "confirm" / "comparisons" / "gc8" / "comparison.json"

    study["confirm"]["seeds"] = [7, 8, 9, 10]
    path.write_text(yaml.safe_dump(study))
    fake_train.calls = []
    out = tmp_path / "second"
    assert study_script.main(common + ["--output_dir", str(out), "--confirm_pool", str(earlier)]) == 0
    assert sorted(call[:2] for call in fake_train.calls if call[0] != "prepare") == sorted(
        (r, f"seed{s}") for r in ("baseline", "gc8") for s in (9, 10))
    pooled = json.loads((out / "confirm" / "comparisons" / "gc8-pooled" / "comparison.json").read_text())
    assert [[r["seed"] for r in arm["runs"]] for arm in pooled["arms"]] == [[7, 8, 9, 10]] * 2
    confirmation = json.loads((out / "confirm" / "confirmation.json").read_text())
    assert confirmation["fid_difference"]["ci95"] == pytest.approx(pooled["fid_difference"]["ci95"])
    assert [p["source"] for p in confirmation["pooled_from"]] == [str(earlier), "the runs trained here"]
    assert f"fresh seeds [7, 8, 9, 10] (measured in {earlier}, the runs trained here)" in \
        (out / "confirm" / "confirmation.md").read_text()

    # A file that holds every confirm seed is the confirmation: nothing trains.
    fake_train.calls = []
    pooled_file = out / "confirm" / "comparisons" / "gc8-pooled" / "comparison.json"
    assert study_script.main(common + ["--output_dir", str(tmp_path / "all"), "--confirm_pool", str(pooled_file)]) == 0
    assert fake_train.calls == []
    everything = json.loads((tmp_path / "all" / "confirm" / "confirmation.json").read_text())
    assert everything["fid_difference"] == pooled["fid_difference"] and everything["throughput"] is None
    # In the folder that holds the runs, the same call also times them, though every seed is pooled.
    assert study_script.main(common + ["--output_dir", str(out), "--confirm_pool", str(pooled_file)]) == 0
    assert fake_train.calls == []
    again = json.loads((out / "confirm" / "confirmation.json").read_text())
    assert again["fid_difference"] == pooled["fid_difference"] and again["throughput"]["train_images_ratio"] > 0

    # Pooled seeds that are not the study's confirm seeds are refused before anything trains.
    study["confirm"]["seeds"] = [9, 10]
    path.write_text(yaml.safe_dump(study))
    fake_train.calls = []
    assert study_script.main(common + ["--output_dir", str(tmp_path / "third"), "--confirm_pool", str(earlier)]) == 2
    assert "--confirm_pool holds seeds [7, 8], which are not the study's confirm seeds [9, 10]" in \
        capsys.readouterr().err
    assert fake_train.calls == []


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "benchmarks").glob("*study*.yaml")))
def test_the_repositorys_study_files_resolve_to_valid_configs(name, tmp_path):
    study = study_script.read_study(ROOT / "benchmarks" / name)
    for row in [study_script.BASELINE, *study["variants"]]:
        assert study_script.run_config(study, row, 0, tmp_path).max_train_steps == study["base"]["max_train_steps"]
    if study["confirm"] is not None:
        confirm = study_script.confirm_study(study)
        assert study_script.run_config(confirm, study_script.BASELINE, 0, tmp_path).data_source == \
            confirm["base"]["data_source"]
