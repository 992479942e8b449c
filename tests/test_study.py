"""The pre-training study: config checks, job planning, target splits, an end-to-end tiny study."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from forcecentric.data import read_all
from forcecentric.errors import ConfigError
from forcecentric.study import (OBJECTIVES, finetune_jobs, load_study_config, markdown_tables, pretrain_jobs,
                                tuned_summary, tuned_table, xtb_dir,
                                prepare, run_study, status, summarize)


def _config(tmp_path, **changes) -> dict:
    cfg = {
        "out": str(tmp_path / "study"),
        "results": str(tmp_path / "study.json"),
        "figures": str(tmp_path / "figures"),
        "model": {"hidden_channels": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff": 4.0},
        "targets": {"aspirin": {"pool": ["bundled:demo_target"], "n_val": 20, "n_test": 30, "kind": "GFN2-xTB"}},
        "pretrain": {
            "corpus": ["bundled:demo_pretrain"],
            "set": {"data.n_train": 40, "data.n_val": 10, "data.batch_size": 8, "trainer.max_epochs": 1,
                    "trainer.progress_bar": False},
            "objectives": {"forces_only": {"loss.zero_force": 0.0, "loss.denoise": 0.0},
                           "full": {"loss.zero_force": 0.1, "loss.denoise": 0.1}},
            "ablations": {"full_sigma0.1": {"base": "full", "loss.denoising.sigma": 0.1}},
            "settings": {"unseen": ["forces_only", "full", "full_sigma0.1"]},
        },
        "finetune": {"set": {"trainer.max_epochs": 2, "trainer.progress_bar": False, "data.batch_size": 5},
                     "n_train": [10, 20, 1000], "seeds": [0, 1], "ablation_n_train": [10]},
    }
    cfg.update(changes)
    return cfg


def _write(tmp_path, cfg: dict):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _jobs_with_variants(tmp_path, cfg_dict: dict, variant_models: list[str]):
    """The fine-tuning plan of a prepared study with an lr1e-3 variant for ``variant_models``."""
    cfg_dict["finetune"].update(variants={"lr1e-3": {"optim.lr": 1.0e-3}}, variant_models=variant_models)
    cfg = load_study_config(_write(tmp_path, cfg_dict))
    prepare(cfg, progress=False)
    return finetune_jobs(cfg)


def test_config_errors_name_the_problem(tmp_path):
    cfg = _config(tmp_path)
    cfg["pretrain"]["settings"]["unseen"].append("forces_typo")
    with pytest.raises(ConfigError, match="forces_typo"):
        load_study_config(_write(tmp_path, cfg))
    cfg = _config(tmp_path)
    cfg["pretrain"]["settings"]["target_in_pretraining"] = ["full"]
    with pytest.raises(ConfigError, match="smiles"):
        load_study_config(_write(tmp_path, cfg))
    cfg = _config(tmp_path, unknown_key=1)
    with pytest.raises(ConfigError, match="unknown_key"):
        load_study_config(_write(tmp_path, cfg))


def test_the_shipped_preset_plans_the_issue_grid():
    cfg = load_study_config("study")
    pre = pretrain_jobs(cfg)
    names = {(j.key["setting"], j.key["model"]) for j in pre}
    for objective in OBJECTIVES:
        assert ("unseen", objective) in names and ("target_in_pretraining", objective) in names
    # each objective differs from the others exactly in its loss weights
    losses = {j.key["model"]: j.config["loss"] for j in pre if j.key["setting"] == "unseen"}
    assert (losses["forces_only"]["zero_force"], losses["forces_only"]["denoise"]) == (0.0, 0.0)
    assert (losses["full"]["zero_force"], losses["full"]["denoise"]) == (0.1, 0.1)
    assert losses["full_sigma0.1_eps"]["denoising"] == {**losses["full"]["denoising"], "sigma": 0.1,
                                                        "target": "eps", "kappa": 1.0}
    jobs = finetune_jobs(cfg)
    keys = {(j.key["molecule"], j.key["model"], j.key["setting"], j.key["n_train"], j.key["seed"]) for j in jobs}
    for n in (50, 100, 250):
        for seed in (0, 1, 2):
            assert ("ethanol", "scratch", "none", n, seed) in keys
            assert ("3BPA", "full", "target_in_pretraining", n, seed) in keys
    # the paper-size ablation is compared with a paper-size ET trained from scratch
    twin = [j for j in jobs if j.key["model"] == "scratch_as_forces_zero_F128L6"]
    assert twin and {(j.config["model"]["hidden_channels"], j.config["model"]["num_layers"]) for j in twin} == {(128, 6)}
    # every fine-tuning run of a target sees the same validation and test files
    for mol in ("ethanol", "3BPA"):
        assert len({(tuple(j.config["data"]["val"]), tuple(j.config["data"]["test"]))
                    for j in jobs if j.key["molecule"] == mol}) == 1


def test_the_paper_size_round_applies_the_first_rounds_fixes_to_every_run():
    """configs/study_paper.yaml: the paper's ET size everywhere, an EMA suited to short pre-trainings,
    annealed early stopping in every fine-tuning, one rate grid for every model, and the first round's
    target splits (same files, same validation and test sizes), so the two rounds compare."""
    cfg, first = load_study_config("study_paper"), load_study_config("study")
    pre, jobs = pretrain_jobs(cfg), finetune_jobs(cfg)
    assert {(j.key["setting"], j.key["model"]) for j in pre} == {("unseen", m) for m in OBJECTIVES} | {
        ("unseen", "forces_only_8min"), ("unseen", "forces_zero_8min"), ("unseen", "forces_only_cont"),
        ("target_in_pretraining", "forces_only_cont"), ("target_in_pretraining", "forces_only_cont_w50"),
        ("target_in_pretraining", "forces_only_cont_w50_800"), ("target_in_pretraining", "forces_only_cont_pool_800"),
        ("target_in_pretraining", "forces_only_cont_methanol_800"), ("unseen", "full_denoise0.01"),
        ("unseen", "forces_only_mol25"), ("unseen", "forces_only_cont_1489"), ("unseen", "forces_only_mdconf3_mol25")}
    # the full objective with the denoising weight at a tenth, bound to full's own steps (a CPU run)
    light = {j.key["model"]: j.config for j in pre if j.key["model"] in ("full", "full_denoise0.01")}
    assert light["full_denoise0.01"]["loss"] == {**light["full"]["loss"], "denoise": 0.01}
    assert (light["full_denoise0.01"]["trainer"]["max_steps"], light["full_denoise0.01"]["trainer"]["max_time_minutes"]) == (1437, None)
    # corpus size: forces_only on a quarter of the molecules, split by molecule, for forces_only's own steps
    small = {j.key["model"]: j.config for j in pre if j.key["model"] in ("forces_only", "forces_only_mol25")}
    assert small["forces_only_mol25"]["loss"] == small["forces_only"]["loss"]
    assert {k: small["forces_only_mol25"]["data"][k] for k in ("train", "split_by_molecule", "n_train", "n_val")} == {
        "train": ["bundled:corpus"], "split_by_molecule": True, "n_train": 270, "n_val": 25}
    assert (small["forces_only_mol25"]["trainer"]["max_steps"], small["forces_only_mol25"]["trainer"]["max_time_minutes"]) == (1489, None)
    # the same on 270 molecules of a corpus with up to 3 minima and MD frames only (built by make_corpus.py)
    md = next(j.config for j in pre if j.key["model"] == "forces_only_mdconf3_mol25")
    assert md["data"]["train"] == ["runs/corpus_md_conf3/store300"] and md["loss"] == small["forces_only"]["loss"]
    for k in ("split_by_molecule", "n_train", "n_val"):
        assert md["data"][k] == small["forces_only_mol25"]["data"][k]
    # the same training; only how often it checkpoints differs (a long CPU run resumed across sessions)
    assert md["trainer"] == {**small["forces_only_mol25"]["trainer"], "checkpoint_every_n_steps": 20}
    longer = [j for j in pre if j.key["model"].endswith("_8min")]
    assert all(j.config["trainer"]["max_time_minutes"] == 8 for j in longer)
    # the continuation: forces_only's model trained on for 240 steps, with ethanol's xTB frames or without
    cont = {(j.key["setting"], j.key["model"]): j for j in pre if "_cont" in j.key["model"]}
    assert all(j.needs.parts[-3:] == ("unseen", "forces_only", "model.ckpt") for j in cont.values())
    assert {j.config["trainer"]["max_steps"] for j in cont.values()} == {240, 800, 1489}
    assert cont["unseen", "forces_only_cont"].config["data"]["train"] == ["bundled:corpus"]
    # the longer pre-training: forces_only's own steps again, on the corpus alone, at the continuations' rate
    twice = cont["unseen", "forces_only_cont_1489"].config
    assert (twice["data"]["train"], twice["trainer"]["max_steps"], twice["optim"]["lr"], twice["loss"]) == (
        ["bundled:corpus"], 1489, 5.0e-4, cont["unseen", "forces_only_cont"].config["loss"])
    assert len(cont["target_in_pretraining", "forces_only_cont"].config["data"]["train"]) == 1 + len(
        list(xtb_dir(cfg).glob("shard-*.extxyz")))
    # the target's frames are half of every batch: they carry their own source name
    assert cont["target_in_pretraining", "forces_only_cont_w50"].config["data"]["source_weights"] == {
        "forcecentric-xtb": 1.0, cfg.target_xtb["source"]: 1.0}
    # or the control's pool (the DFT pool's geometries with xTB labels) in their place; fine-tuned on DFT only
    pool = cont["target_in_pretraining", "forces_only_cont_pool_800"].config["data"]
    assert pool["train"][-1].endswith("targets/ethanol_xtb/pretrain_pool.extxyz")
    assert pool["source_weights"] == {"forcecentric-xtb": 1.0, "ethanol_xtb-pool": 1.0}
    assert {j.key["molecule"] for j in jobs if j.key["model"] == "forces_only_cont_pool_800"} == {"ethanol"}
    assert "methanol" not in {j.key["molecule"] for j in jobs}  # a pool only (finetune: false)
    assert cfg.targets["methanol"].select == {"config_type": "methanol"}
    for j in pre + jobs:
        m = j.config["model"]
        assert (m["hidden_channels"], m["num_layers"], m["num_heads"]) == (128, 6, 8)
    assert {j.config["optim"]["ema_decay"] for j in pre} == {0.99}
    assert all(j.config["trainer"]["early_stopping_at_min_lr"] for j in jobs)
    rates = {}
    for j in jobs:
        if j.key["n_train"] == 50 and j.key["seed"] == 0 and j.key["molecule"] == "ethanol":
            rates.setdefault(j.key["model"], set()).add(j.config["optim"]["lr"])
    assert rates == {**{m: {5.0e-4, 1.0e-3, 2.0e-3} for m in ("scratch", *OBJECTIVES, "forces_only_8min",
                                                              "forces_zero_8min")},
                     "forces_only_cont": {1.0e-3}, "forces_only_cont_w50": {1.0e-3},
                     "forces_only_cont_w50_800": {1.0e-3}, "forces_only_cont_pool_800": {1.0e-3},
                     "forces_only_cont_methanol_800": {1.0e-3}, "full_denoise0.01": {1.0e-3},
                     "forces_only_mol25": {1.0e-3}, "forces_only_cont_1489": {1.0e-3},
                     "forces_only_mdconf3_mol25": {1.0e-3}}
    # the issue's largest size: scratch and the four objectives at the preset rate (the pool holds 1,000 frames)
    big = {(j.key["model"], j.key["finetune"]) for j in jobs if j.key["n_train"] == 1000 and j.key["molecule"] == "ethanol"}
    assert big == {(m, "default") for m in ("scratch", *OBJECTIVES)}
    for name in ("ethanol", "3BPA"):
        a, b = cfg.targets[name], first.targets[name]
        assert (a.pool, a.heldout, a.n_val, a.n_test) == (b.pool, b.heldout, b.n_val, b.n_test)


def test_the_gpu_round_script_collects_finished_runs_without_checkpoints(tmp_path):
    """benchmarks/study_paper_gpu.sh collect: finished fine-tunings (metrics.json) and the pre-training
    records travel back without their checkpoints; each pre-trained model comes back as NAME.ckpt."""
    import subprocess
    import tarfile
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "study_paper_gpu.sh"
    work, dest = tmp_path / "work", tmp_path / "back"
    files = {
        "finetune/ethanol/scratch/n50_seed0/metrics.json": "{}",
        "finetune/ethanol/scratch/n50_seed0/model.ckpt": "w",
        "finetune/ethanol/scratch/n50_seed0/checkpoints/last.ckpt": "w",
        "finetune/ethanol/scratch/n50_seed1/metrics.csv": "unfinished",
        "finetune/ethanol/scratch/n50_seed1/checkpoints/last.ckpt": "w",
        "pretrain/unseen/forces_only/metrics.json": "{}",
        "pretrain/unseen/forces_only/model.ckpt": "pre-trained",
        "pretrain/unseen/forces_only/checkpoints/last.ckpt": "w",
        "logs/start": "0",
        "logs/gpu.txt": "cpu",
        "logs/pretrain.log": "INFO noise\nthe pre-training log",
    }
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    proc = subprocess.run(["bash", str(script), "collect", str(dest)], env={"WORK": str(work), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(dest / "finetune.tgz") as tar:
        names = {n for n in tar.getnames() if not tar.getmember(n).isdir()}
    assert names == {"finetune/ethanol/scratch/n50_seed0/metrics.json"}
    with tarfile.open(dest / "pretrain.tgz") as tar:
        names = {n for n in tar.getnames() if not tar.getmember(n).isdir()}
    assert names == {"pretrain/unseen/forces_only/metrics.json"}
    assert (dest / "forces_only.ckpt").read_text() == "pre-trained"
    log = (dest / "logs.txt").read_text()
    assert "finished fine-tunings: 1" in log and "the pre-training log" in log and "INFO noise" not in log


def test_the_gpu_round_script_can_run_chosen_pretrainings_only(tmp_path):
    """PRETRAIN_ONLY=NAMES FINETUNE=0 bash benchmarks/study_paper_gpu.sh start: those pre-trainings,
    detached, and nothing else (here a tiny study on the CPU)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "study_paper_gpu.sh"
    cfg_path = _write(tmp_path, _config(tmp_path))
    work = tmp_path / "work"
    (work / "targets").mkdir(parents=True)
    env = {**os.environ, "CONFIG": str(cfg_path), "WORK": str(work), "ACCEL": "cpu",
           "PRETRAIN_ONLY": "forces_only", "FINETUNE": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for args in (["start"], ["wait", "300"]):
        proc = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=320)
        assert proc.returncode == 0, proc.stderr
    assert (work / "logs" / "done").is_file(), (work / "logs" / "round.log").read_text()
    assert (work / "pretrain" / "unseen" / "forces_only" / "model.ckpt").is_file()
    assert not (work / "pretrain" / "unseen" / "full").exists()
    assert not (work / "finetune").exists()


def test_planning_skips_sizes_the_pool_cannot_give_and_limits_ablations(tmp_path):
    cfg = load_study_config(_write(tmp_path, _config(tmp_path)))
    before = finetune_jobs(cfg)
    assert any(j.key["n_train"] == 1000 for j in before)  # pool size not known before prepare
    prepare(cfg, progress=False)
    jobs = finetune_jobs(cfg)
    assert all(j.key["n_train"] < 1000 for j in jobs)
    ablation = [j for j in jobs if j.key["model"] == "full_sigma0.1"]
    assert {j.key["n_train"] for j in ablation} == {10}
    # 1 scratch + 2 objectives at N=10,20, 1 ablation at N=10; 2 seeds
    assert len(jobs) == 2 * (3 * 2 + 1)
    assert all(j.needs is None for j in jobs if j.key["model"] == "scratch")
    assert all(str(j.needs).endswith("unseen/full/model.ckpt") for j in jobs if j.key["model"] == "full")
    # the smallest N comes first, with all its seeds: a partial study holds whole comparisons
    assert [j.key["n_train"] for j in jobs[:8]] == [10] * 8
    assert [j.key["seed"] for j in jobs[:8]] == [0] * 4 + [1] * 4


def test_finetune_variants_run_at_the_ablation_size_for_the_named_models(tmp_path):
    jobs = _jobs_with_variants(tmp_path, _config(tmp_path), ["scratch", "full"])
    variant = [j for j in jobs if j.key["finetune"] == "lr1e-3"]
    # scratch and full at the ablation N only, every seed; their own run directories
    assert sorted((j.key["model"], j.key["n_train"], j.key["seed"]) for j in variant) == [
        ("full", 10, 0), ("full", 10, 1), ("scratch", 10, 0), ("scratch", 10, 1)]
    assert all(j.config["optim"]["lr"] == 1.0e-3 for j in variant)
    assert all(j.config["optim"]["lr"] != 1.0e-3 for j in jobs if j.key["finetune"] == "default")
    assert len({j.run_dir for j in jobs}) == len(jobs)
    assert str(next(j for j in variant if j.key["model"] == "full" and j.key["seed"] == 0).run_dir).endswith(
        "finetune/aspirin/unseen/full/n10_seed0_lr1e-3")
    for bad, match in (({"variant_models": ["forces_typo"]}, "forces_typo"),
                       ({"variants": {"default": {"optim.lr": 1.0}}}, "default")):
        cfg_dict = _config(tmp_path)
        cfg_dict["finetune"].update(bad)
        with pytest.raises(ConfigError, match=match):
            load_study_config(_write(tmp_path, cfg_dict))


def test_a_variant_with_its_own_models_runs_for_those_only(tmp_path):
    """finetune.variants.NAME.models replaces variant_models for that variant (a pre-trained-only
    setting such as optim.representation_lr_factor), and is not passed on as a config key."""
    cfg_dict = _config(tmp_path)
    cfg_dict["finetune"].update(variants={"lr1e-3": {"optim.lr": 1.0e-3},
                                          "gentle": {"optim.representation_lr_factor": 0.1, "models": ["full"]}},
                                variant_models=["scratch", "forces_only"])
    cfg = load_study_config(_write(tmp_path, cfg_dict))
    prepare(cfg, progress=False)
    jobs = finetune_jobs(cfg)
    models = lambda v: sorted({j.key["model"] for j in jobs if j.key["finetune"] == v})  # noqa: E731
    assert models("lr1e-3") == ["forces_only", "scratch"]
    assert models("gentle") == ["full"]
    gentle = [j for j in jobs if j.key["finetune"] == "gentle"]
    assert len(gentle) == 2 and all(j.config["optim"]["representation_lr_factor"] == 0.1 for j in gentle)
    assert all("models" not in j.config for j in gentle)
    for bad in (["forces_typo"], "full", ["target_in_pretraining/full"]):
        cfg_dict["finetune"]["variants"]["gentle"]["models"] = bad
        with pytest.raises(ConfigError, match="variants.gentle.models"):
            load_study_config(_write(tmp_path, cfg_dict))
    # SETTING/NAME: a pre-training of the target_in_pretraining setting gets the variant too
    cfg_dict["targets"]["aspirin"]["smiles"] = "CC(=O)Oc1ccccc1C(=O)O"
    cfg_dict["pretrain"]["settings"]["target_in_pretraining"] = ["forces_only"]
    cfg_dict["finetune"]["variants"]["gentle"]["models"] = ["full", "target_in_pretraining/forces_only"]
    cfg = load_study_config(_write(tmp_path, cfg_dict))
    gentle = [j for j in finetune_jobs(cfg) if j.key["finetune"] == "gentle"]
    assert sorted({(j.key["setting"], j.key["model"]) for j in gentle}) == [
        ("target_in_pretraining", "forces_only"), ("unseen", "full")]
    tip = next(j for j in gentle if j.key["setting"] == "target_in_pretraining")
    assert str(tip.needs).endswith("pretrain/target_in_pretraining/forces_only/model.ckpt")
    assert tip.config["optim"]["representation_lr_factor"] == 0.1
    # variant_models stays with the unseen setting: lr1e-3 is not run for the other setting's forces_only
    assert {j.key["setting"] for j in finetune_jobs(cfg) if j.key["finetune"] == "lr1e-3"} == {"none", "unseen"}


def test_prepare_splits_disjoint_val_test_and_keeps_the_labels(tmp_path):
    cfg = load_study_config(_write(tmp_path, _config(tmp_path)))
    report = prepare(cfg, progress=False)
    assert report["aspirin"] == {**report["aspirin"], "pool": 350, "val": 20, "test": 30}
    tdir = tmp_path / "study" / "targets" / "aspirin"
    parts = {k: read_all(tdir / f"{k}.extxyz") for k in ("pool", "val", "test")}
    source = read_all(__import__("forcecentric.train.datamodule", fromlist=["x"]).resolve_path("bundled:demo_target"))
    key = lambda r: r.pos.round(6).tobytes()  # noqa: E731
    sets = {k: {key(r) for r in v} for k, v in parts.items()}
    assert not (sets["val"] & sets["test"]) and not (sets["pool"] & (sets["val"] | sets["test"]))
    assert len(sets["pool"] | sets["val"] | sets["test"]) == len(source)
    by_pos = {key(r): r for r in source}
    for r in parts["test"][:5]:
        ref = by_pos[key(r)]
        assert r.energy == pytest.approx(ref.energy, abs=1e-6)
        np.testing.assert_allclose(r.forces, ref.forces, atol=1e-6)
    # a second prepare reuses the split
    assert prepare(cfg, progress=False)["aspirin"] == report["aspirin"]


def test_a_relabelled_target_has_the_same_frames_with_xtb_labels(tmp_path):
    """relabel: xtb gives the control target: the frames the plain target's split picks, in the same
    order, with fresh GFN2-xTB labels in place of their own."""
    pytest.importorskip("tblite")
    from forcecentric.data.label import write_extxyz
    from forcecentric.train.datamodule import resolve_path

    # 12 GFN2-xTB aspirin frames with their forces doubled and energies shifted: "another level of theory"
    frames = read_all(resolve_path("bundled:demo_target"))[:12]
    other = tmp_path / "other_level.extxyz"
    atoms = [f.to_atoms() for f in frames]
    for a, f in zip(atoms, frames):
        a.calc.results.update(forces=2.0 * f.forces, energy=f.energy + 5.0)
    write_extxyz(other, atoms)
    target = {"pool": [str(other)], "n_val": 3, "n_test": 4, "kind": "other"}
    cfg = _config(tmp_path, targets={"plain": target, "control": dict(target, relabel="xtb", kind="xTB")})
    prepare(load_study_config(_write(tmp_path, cfg)), progress=False)
    root = tmp_path / "study" / "targets"
    for part in ("pool", "val", "test"):
        plain, control = read_all(root / "plain" / f"{part}.extxyz"), read_all(root / "control" / f"{part}.extxyz")
        assert len(plain) == len(control) > 0
        for p, c in zip(plain, control):
            np.testing.assert_array_equal(p.pos, c.pos)
            original = next(f for f in frames if np.array_equal(f.pos, c.pos))
            np.testing.assert_allclose(p.forces, 2.0 * original.forces, atol=1e-9)
            np.testing.assert_allclose(c.forces, original.forces, atol=1e-5)  # xTB again, not the doubled ones
            assert c.energy == pytest.approx(original.energy, abs=1e-5)
            assert c.level_of_theory == "GFN2-xTB"
    assert json.loads((root / "control" / "split.json").read_text())["relabel"] == "xtb"


def test_a_dft_pool_target_trains_on_its_xtb_frames_with_dft_labels(tmp_path):
    """dft_pool: n of the study's own xTB frames of the target's SMILES, labelled with DFT (PySCF),
    are the training pool; validation and test frames come from the held-out files unchanged."""
    pytest.importorskip("tblite")
    pytest.importorskip("pyscf")
    from forcecentric.data.dft import DFTSettings, dft_labels

    cfg, cfg_dict, target, root = _prepared_water_dft_pool(
        tmp_path, {"n": 2, "seed": 1}, md_frames_per_T=3, kind="DFT at xTB geometries")
    held = target["heldout"][0]
    water = read_all(held)
    pool = read_all(root / "pool.extxyz")
    xtb = [r for p in sorted(xtb_dir(cfg).glob("shard-*.extxyz")) for r in read_all(p)]
    assert len(pool) == 2 and len(xtb) >= 3
    for rec in pool:
        source = xtb[rec.info["relabel_index"]]
        np.testing.assert_allclose(rec.pos, source.pos, atol=1e-8)  # an xTB-sampled geometry ...
        assert source.level_of_theory == "GFN2-xTB" and rec.level_of_theory == "PBE/sto-3g"
        energy, forces = dft_labels(rec.z, rec.pos, settings=DFTSettings(basis="sto-3g", density_fit=False))
        np.testing.assert_allclose(rec.forces, forces, atol=1e-6)  # ... with DFT labels
    assert sorted(f"{r.energy:.6f}" for r in read_all(root / "val.extxyz") + read_all(root / "test.extxyz")) == \
        sorted(f"{w.energy:.6f}" for w in water)  # the held-out frames keep their own labels
    assert json.loads((root / "split.json").read_text())["dft_pool"]["n"] == 2
    # a pool and a dft_pool at once, or a dft_pool without held-out frames, are refused
    for bad in (dict(target, pool=[str(held)]), {k: v for k, v in target.items() if k != "heldout"}):
        with pytest.raises(ConfigError, match="targets.water"):
            load_study_config(_write(tmp_path, _config(tmp_path, targets={"water": bad})))


def test_a_dft_pool_can_sample_its_own_xtb_frames(tmp_path):
    """dft_pool.xtb: the target's own GFN2-xTB frames, with target_xtb's settings changed (here more MD
    frames), in targets/NAME/xtb/; the pool draws from them, not from the shared frames. Unknown
    labeller settings are refused."""
    pytest.importorskip("tblite")
    pytest.importorskip("pyscf")
    cfg, cfg_dict, target, root = _prepared_water_dft_pool(
        tmp_path, {"n": 4, "xtb": {"md_frames_per_T": 6, "n_embed": 2}}, md_frames_per_T=2)
    shared = [r for p in sorted(xtb_dir(cfg).glob("shard-*.extxyz")) for r in read_all(p)]
    own = [r for p in sorted((root / "xtb").glob("shard-*.extxyz")) for r in read_all(p)]
    assert sum(not r.equilibrium for r in shared) == 2 and sum(not r.equilibrium for r in own) == 6
    assert json.loads((root / "xtb" / "label_settings.json").read_text())["settings"]["n_embed"] == 2
    pool = read_all(root / "pool.extxyz")
    assert len(pool) == 4
    for rec in pool:
        np.testing.assert_allclose(rec.pos, own[rec.info["relabel_index"]].pos, atol=1e-8)
    bad = dict(target, dft_pool=dict(target["dft_pool"], xtb={"n_embedd": 30}))
    with pytest.raises(ConfigError, match="n_embedd"):
        load_study_config(_write(tmp_path, dict(cfg_dict, targets={"water": bad})))


def test_a_dft_sampler_pool_samples_normal_modes_around_the_dft_minimum(tmp_path):
    """dft_pool with sampler: dft: the target's xTB minimum is optimized again at DFT level, its DFT
    Hessian gives the modes, and n normal-mode samples around that minimum carry DFT labels; a rerun
    reuses the minimum and the modes kept in dft_sampler/."""
    pytest.importorskip("tblite")
    pytest.importorskip("pyscf")
    from ase.io import read

    from forcecentric.data.dft import DFTSettings, dft_labels

    cfg, cfg_dict, target, root = _prepared_water_dft_pool(
        tmp_path, {"n": 3, "seed": 1, "sampler": "dft"}, md_frames_per_T=1,
        normal_mode_temperatures=[300.0, 600.0])
    settings = DFTSettings(basis="sto-3g", density_fit=False)
    minimum = read(root / "dft_sampler" / "minimum-0.extxyz")
    xtb_min = next(r for p in sorted(xtb_dir(cfg).glob("shard-*.extxyz")) for r in read_all(p)
                   if r.info["sampling"] == "minimum")
    assert minimum.info["level_of_theory"] == "PBE/sto-3g"
    assert np.linalg.norm(dft_labels([8, 1, 1], minimum.positions, settings=settings)[1], axis=1).max() < 0.01
    assert minimum.get_distance(0, 1) - np.linalg.norm(xtb_min.pos[1] - xtb_min.pos[0]) > 0.03  # moved
    pool = read_all(root / "pool.extxyz")
    assert len(pool) == 3
    assert sorted(r.info["temperature_K"] for r in pool) == [300.0, 300.0, 600.0]
    for rec in pool:
        assert rec.level_of_theory == "PBE/sto-3g" and rec.info["relabelled_from"] == "GFN2-xTB"
        energy, forces = dft_labels(rec.z, rec.pos, settings=settings)
        np.testing.assert_allclose(rec.forces, forces, atol=1e-6)
        displacement = np.linalg.norm(rec.pos - minimum.positions, axis=1).max()
        assert 1e-3 < displacement < 0.3  # a thermal sample around the DFT minimum
    bad = dict(target, dft_pool=dict(target["dft_pool"], select={"sampling": "md"}))
    with pytest.raises(ConfigError, match="sampler: dft"):
        load_study_config(_write(tmp_path, dict(cfg_dict, targets={"water": bad})))
    # a rerun of the sampler (its samples file gone) reuses the kept minimum and modes: same samples
    first = [r.pos for r in read_all(root / "dft_sampler" / "samples_xtb_labels.extxyz")]
    (root / "dft_sampler" / "samples_xtb_labels.extxyz").unlink()
    stamp = (root / "dft_sampler" / "modes-0.npz").stat().st_mtime_ns
    from forcecentric.study import _dft_normal_mode_frames

    again = read_all(_dft_normal_mode_frames(cfg, "water", cfg.targets["water"], settings,
                                             sorted(xtb_dir(cfg).glob("shard-*.extxyz"))))
    assert (root / "dft_sampler" / "modes-0.npz").stat().st_mtime_ns == stamp
    np.testing.assert_allclose([r.pos for r in again], first, atol=1e-10)


def _prepared_water_dft_pool(tmp_path, dft_pool: dict, kind: str = "DFT", **target_xtb):
    """A prepared study of one water target whose pool is ``dft_pool`` (PBE/STO-3G, exact integrals:
    fast), held out on :func:`_water_frames`, with a small xTB sampling (``target_xtb`` changes it).
    Returns the config, its dict, the target's dict and the target's folder."""
    held = _water_frames(tmp_path)
    target = {"smiles": "O", "dft_pool": {"basis": "sto-3g", "density_fit": False, **dft_pool},
              "heldout": [str(held)], "n_val": 1, "n_test": 2, "kind": kind}
    cfg_dict = _config(tmp_path, targets={"water": target},
                       target_xtb={"n_conformers": 1, "temperatures": [300.0], "equilibration_steps": 2,
                                   "interval_steps": 1, "n_normal_mode": 0, **target_xtb})
    cfg_dict["pretrain"]["settings"]["target_in_pretraining"] = ["forces_only"]
    cfg = load_study_config(_write(tmp_path, cfg_dict))
    prepare(cfg, progress=False)
    return cfg, cfg_dict, target, tmp_path / "study" / "targets" / "water"


def _water_frames(tmp_path):
    """Three water frames with made-up labels, as the held-out reference of a dft_pool target."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from forcecentric.data.label import write_extxyz

    atoms = []
    for i in range(3):
        a = Atoms("OH2", positions=[[0, 0, 0.12], [0, 0.76 + 0.01 * i, -0.47], [0, -0.76, -0.47]])
        a.calc = SinglePointCalculator(a, energy=-2000.0 - i, forces=np.full((3, 3), 0.1 * i))
        atoms.append(a)
    return write_extxyz(tmp_path / "water_frames.extxyz", atoms)


def test_a_continued_pretraining_waits_for_its_parent_and_starts_from_it(tmp_path):
    """An ablation with 'from: NAME' trains on from NAME's pre-trained model: planned with that
    model as its init_from, started only once it exists, even when listed (and run) together."""
    from forcecentric.study import _xtb_targets

    cfg_dict = _config(tmp_path)
    cfg_dict["pretrain"]["ablations"]["cont"] = {"from": "forces_only", "optim.lr": 1e-4}  # forces_only's objective
    cfg_dict["pretrain"]["settings"]["unseen"] = ["cont", "forces_only"]  # the child first
    cfg = load_study_config(_write(tmp_path, cfg_dict))
    jobs = {j.key["model"]: j for j in pretrain_jobs(cfg)}
    parent = tmp_path / "study" / "pretrain" / "unseen" / "forces_only" / "model.ckpt"
    assert jobs["cont"].needs == parent and jobs["cont"].config["init_from"] == str(parent)
    assert jobs["cont"].config["optim"]["lr"] == 1e-4 and "from" not in jobs["cont"].config
    assert jobs["cont"].config["loss"] == jobs["forces_only"].config["loss"]  # its parent's loss, not full's
    assert jobs["forces_only"].needs is None
    out = run_study(cfg, phase="pretrain", workers=2, progress=False)
    assert [r["ok"] for r in out["pretrain"]] == [True, True], out
    child = tmp_path / "study" / "pretrain" / "unseen" / "cont"
    assert json.loads((child / "metrics.json").read_text())["init_from"] == str(parent)
    assert (child / "config.yaml").stat().st_mtime >= parent.stat().st_mtime
    # a parent that fails leaves its child skipped with a message, not waiting for ever
    cfg_dict["out"] = str(tmp_path / "failing")
    cfg_dict["pretrain"]["objectives"]["forces_only"]["optim.lr"] = -1.0
    out = run_study(load_study_config(_write(tmp_path, cfg_dict)), phase="pretrain", workers=2, progress=False)
    assert [(r["ok"], r["run_dir"].split("/")[-1]) for r in out["pretrain"]] == [(False, "forces_only")]
    assert not (tmp_path / "failing" / "pretrain" / "unseen" / "cont").exists()
    for bad in ("cont", "forces_typo"):
        cfg_dict["pretrain"]["ablations"]["cont"]["from"] = bad
        with pytest.raises(ConfigError, match="ablations.cont.from"):
            load_study_config(_write(tmp_path, cfg_dict))
    # a target and its relabelled control (same SMILES) share one set of xTB pre-training frames
    target = {"pool": ["bundled:demo_target"], "smiles": "CC(=O)Oc1ccccc1C(=O)O"}
    cfg_dict = _config(tmp_path, targets={"asp": target, "asp_xtb": dict(target, relabel="xtb"),
                                          "eth": dict(target, smiles="CCO")})
    cfg_dict["pretrain"]["settings"]["target_in_pretraining"] = ["forces_only"]
    assert _xtb_targets(load_study_config(_write(tmp_path, cfg_dict))) == [
        ("asp", "CC(=O)Oc1ccccc1C(=O)O"), ("eth", "CCO")]


def test_a_pretraining_on_a_corpus_not_built_here_is_skipped_with_a_message(tmp_path, caplog):
    """An ablation whose data.train names a corpus that does not exist (one built by a script, like
    the study_paper preset's forces_only_mdconf3_mol25) is left out with a message naming the
    path; the other pre-trainings run, and it runs once the corpus is there."""
    cfg_dict = _config(tmp_path)
    missing = tmp_path / "corpus_not_built"
    cfg_dict["pretrain"]["ablations"]["other_corpus"] = {"base": "forces_only", "data.train": [str(missing)]}
    cfg_dict["pretrain"]["settings"]["unseen"] = ["other_corpus", "forces_only"]
    cfg = load_study_config(_write(tmp_path, cfg_dict))
    assert {j.key["model"]: j.config["data"]["train"] for j in pretrain_jobs(cfg)}["other_corpus"] == [str(missing)]
    with caplog.at_level("WARNING", logger="forcecentric"):
        out = run_study(cfg, phase="pretrain", workers=1, progress=False)
    assert [(r["ok"], r["run_dir"].split("/")[-1]) for r in out["pretrain"]] == [(True, "forces_only")]
    assert any("other_corpus" in m and str(missing) in m and "does not exist" in m for m in caplog.messages)
    assert status(cfg)["pretrain"]["done"] == 1
    from forcecentric.train.datamodule import resolve_path

    shutil.copy(resolve_path("bundled:demo_pretrain"), missing)  # now it is there
    out = run_study(cfg, phase="pretrain", workers=1, progress=False)
    assert [(r["ok"], r["run_dir"].split("/")[-1]) for r in out["pretrain"]] == [(True, "other_corpus")]


def test_a_pretraining_with_a_targets_pool_trains_on_it_and_is_not_finetuned_on_that_target(tmp_path):
    """'pools: [T]' adds target T's whole training pool, under the source name T-pool, to a
    target_in_pretraining ablation's corpus (data.source_weights can then weight it); the model is
    fine-tuned on the other targets only, not on T, whose own frames it has seen."""
    pytest.importorskip("tblite")
    from forcecentric.study import pool_corpus_file

    target = {"pool": ["bundled:demo_target"], "n_val": 20, "n_test": 30, "smiles": "CC(=O)Oc1ccccc1C(=O)O"}
    cfg_dict = _config(tmp_path, targets={"asp": target, "asp_ctl": dict(target)},
                       target_xtb={"n_conformers": 1, "temperatures": [300.0], "md_frames_per_T": 2,
                                   "equilibration_steps": 2, "interval_steps": 1, "n_normal_mode": 0})
    cfg_dict["pretrain"]["ablations"]["with_pool"] = {
        "from": "forces_only", "pools": ["asp_ctl"], "data.source_weights": {"asp_ctl-pool": 1.0}}
    cfg_dict["pretrain"]["settings"] = {"unseen": ["forces_only"], "target_in_pretraining": ["with_pool"]}
    cfg_dict["finetune"]["n_train"] = [10]
    cfg = load_study_config(_write(tmp_path, cfg_dict))
    prepare(cfg, progress=False)
    pool_corpus_file(cfg, "asp_ctl").unlink()
    with pytest.raises(ConfigError, match="pool files"):
        run_study(cfg, phase="pretrain", progress=False)  # made by prepare
    prepare(cfg, progress=False)  # makes it again, keeping the split
    pool = read_all(tmp_path / "study" / "targets" / "asp_ctl" / "pool.extxyz")
    as_corpus = read_all(pool_corpus_file(cfg, "asp_ctl"))
    assert len(as_corpus) == len(pool) == 350 and {r.source for r in as_corpus} == {"asp_ctl-pool"}
    for a, b in zip(pool, as_corpus):
        np.testing.assert_array_equal(a.pos, b.pos)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-9)
    jobs = {j.key["model"]: j for j in pretrain_jobs(cfg)}
    assert jobs["with_pool"].config["data"]["train"][-1] == str(pool_corpus_file(cfg, "asp_ctl"))
    assert "pools" not in jobs["with_pool"].config
    planned = {(j.key["molecule"], j.key["model"]) for j in finetune_jobs(cfg) if j.key["seed"] == 0}
    assert ("asp", "with_pool") in planned and ("asp_ctl", "with_pool") not in planned
    assert ("asp_ctl", "forces_only") in planned
    # the sampler draws the pool's frames by their source name: the run trains on them alone
    out = run_study(cfg, phase="pretrain", workers=1, progress=False)
    assert [r["ok"] for r in out["pretrain"]] == [True, True], out
    # errors name the ablation: an unknown target, and a pool in the unseen setting
    for pools, settings, match in ((["aspx"], None, "with_pool.pools"),
                                   (["asp_ctl"], {"unseen": ["forces_only", "with_pool"]}, "unseen setting")):
        cfg_dict["pretrain"]["ablations"]["with_pool"]["pools"] = pools
        if settings:
            cfg_dict["pretrain"]["settings"] = settings
        with pytest.raises(ConfigError, match=match):
            load_study_config(_write(tmp_path, cfg_dict))


def test_a_data_only_target_keeps_its_selected_frames_and_is_not_finetuned(tmp_path):
    """select keeps one molecule of a mixed file (in pool and held-out frames); finetune: false makes
    a target a training pool for an ablation's 'pools' only; a select that matches nothing is an error."""
    from forcecentric.data.label import write_extxyz
    from forcecentric.errors import DataError
    from forcecentric.train.datamodule import resolve_path

    frames = read_all(resolve_path("bundled:demo_target"))[:60]
    atoms = [f.to_atoms() for f in frames]
    for i, a in enumerate(atoms):
        a.info["config_type"] = "kept" if i % 3 else "other"
    mixed = tmp_path / "mixed.extxyz"
    write_extxyz(mixed, atoms)
    cfg_dict = _config(tmp_path)
    cfg_dict["targets"]["extra"] = {"pool": [str(mixed)], "n_val": 5, "n_test": 5,
                                    "select": {"config_type": "kept"}, "finetune": False}
    cfg = load_study_config(_write(tmp_path, cfg_dict))
    report = prepare(cfg, progress=False)
    assert (report["extra"]["pool"], report["extra"]["val"], report["extra"]["test"]) == (30, 5, 5)
    split = [r for part in ("pool", "val", "test") for r in read_all(tmp_path / "study" / "targets" / "extra" / f"{part}.extxyz")]
    assert {r.info["config_type"] for r in split} == {"kept"} and len(split) == 40
    jobs = finetune_jobs(cfg)
    assert jobs and {j.key["molecule"] for j in jobs} == {"aspirin"}
    cfg_dict["out"] = str(tmp_path / "none")
    cfg_dict["targets"]["extra"]["select"] = {"config_type": "typo"}
    with pytest.raises(DataError, match="'extra'.*typo"):
        prepare(load_study_config(_write(tmp_path, cfg_dict)), progress=False)


def test_finetune_before_prepare_is_refused(tmp_path):
    cfg = load_study_config(_write(tmp_path, _config(tmp_path)))
    with pytest.raises(ConfigError, match="prepare"):
        run_study(cfg, phase="finetune", progress=False)


def test_finetune_needs_only_the_targets_it_runs_to_be_split(tmp_path):
    """A new target not yet prepared (its DFT labels still running) does not block fine-tuning the
    others with --only molecule=...; without that filter it is refused by name."""
    cfg_dict = _config(tmp_path)
    cfg_dict["targets"]["later"] = dict(cfg_dict["targets"]["aspirin"])
    cfg = load_study_config(_write(tmp_path, cfg_dict))
    prepare(cfg, progress=False)
    shutil.rmtree(tmp_path / "study" / "targets" / "later")
    with pytest.raises(ConfigError, match=r"\['later'\] are not split"):
        run_study(cfg, phase="finetune", progress=False)
    out = run_study(cfg, phase="finetune", progress=False, filters={"molecule": ["aspirin"], "seed": ["7"]})
    assert out["finetune"] == []  # past the check: no job has seed 7


def test_a_size_changing_ablation_gets_a_same_size_scratch_twin(tmp_path):
    cfg_dict = _config(tmp_path)
    cfg_dict["pretrain"]["ablations"]["full_F32"] = {"base": "full", "model.hidden_channels": 32}
    cfg_dict["pretrain"]["settings"]["unseen"].append("full_F32")
    jobs = _jobs_with_variants(tmp_path, cfg_dict, ["scratch", "full_F32"])
    twin = [j for j in jobs if j.key["model"] == "scratch_as_full_F32"]
    # random weights at the ablation's size, where the ablation runs (N=10), with its variants too
    assert sorted((j.key["n_train"], j.key["seed"], j.key["finetune"]) for j in twin) == [
        (10, 0, "default"), (10, 0, "lr1e-3"), (10, 1, "default"), (10, 1, "lr1e-3")]
    assert all(j.needs is None and "init_from" not in j.config and j.key["setting"] == "none" for j in twin)
    assert {j.config["model"]["hidden_channels"] for j in twin} == {32}
    assert {j.config["model"]["hidden_channels"] for j in jobs if j.key["model"] == "scratch"} == {16}
    # an ablation that keeps the model's size has no twin
    assert not any(j.key["model"] == "scratch_as_full_sigma0.1" for j in jobs)
    cfg_dict["pretrain"]["ablations"]["scratch_big"] = {"base": "full"}
    with pytest.raises(ConfigError, match="scratch_big"):
        load_study_config(_write(tmp_path, cfg_dict))


def test_a_twin_is_the_baseline_of_its_ablation_where_it_ran():
    def row(model, n, val, test, ft="default"):
        setting = "none" if model.startswith("scratch") else "unseen"
        return {"molecule": "m", "setting": setting, "model": model, "n_train": n, "seed": 0, "finetune": ft,
                "val_force_mae": val, "force_mae": test, "energy_mae": 1.0}

    rows = [row("scratch", 50, 100.0, 100.0), row("scratch_as_big", 50, 90.0, 90.0), row("big", 50, 45.0, 45.0),
            row("full", 50, 50.0, 50.0), row("scratch", 100, 80.0, 80.0), row("big", 100, 40.0, 40.0)]
    summary = {(s["model"], s["n_train"]): s for s in summarize(rows)}
    assert summary["big", 50]["baseline"] == "scratch_as_big"
    assert summary["big", 50]["ratio_scratch_over_model"] == pytest.approx(2.0)
    assert summary["full", 50]["ratio_scratch_over_model"] == pytest.approx(2.0)
    assert summary["scratch_as_big", 50]["ratio_scratch_over_model"] is None
    # no twin at N=100: the plain scratch run is the only baseline there
    assert summary["big", 100]["baseline"] == "scratch"
    assert summary["big", 100]["ratio_scratch_over_model"] == pytest.approx(2.0)
    assert "| big (unseen) | 45.0 ± 0.0 (2.00× vs scratch_as_big) [1 seed] |" in markdown_tables(list(summary.values()))
    rows += [row("scratch_as_big", 50, 80.0, 60.0, "lr1e-3"), row("big", 50, 50.0, 30.0, "lr1e-3"),
             row("scratch", 50, 95.0, 95.0, "lr1e-3")]
    tuned = {t["model"]: t for t in tuned_summary(rows)}
    assert tuned["scratch_as_big"]["finetune"] == "lr1e-3" and tuned["big"]["finetune"] == "default"
    assert tuned["big"]["baseline"] == "scratch_as_big"
    assert tuned["big"]["ratio_scratch_over_model"] == pytest.approx(60.0 / 45.0)
    assert tuned["scratch_as_big"]["ratio_scratch_over_model"] is None
    assert "45.0 ± 0.0 (1.33× vs scratch_as_big)" in tuned_table(list(tuned.values()))


def test_summary_ratios_and_table():
    rows = []
    for seed, (s, p) in enumerate([(100.0, 40.0), (110.0, 60.0), (90.0, 50.0)]):
        rows.append({"molecule": "m", "setting": "none", "model": "scratch", "n_train": 50, "seed": seed,
                     "force_mae": s, "energy_mae": 1.0})
        rows.append({"molecule": "m", "setting": "unseen", "model": "full", "n_train": 50, "seed": seed,
                     "force_mae": p, "energy_mae": None})
    summary = summarize(rows)
    full = next(s for s in summary if s["model"] == "full")
    assert full["force_mae_mean"] == pytest.approx(50.0)
    assert full["force_mae_std"] == pytest.approx(10.0)
    assert full["ratio_scratch_over_model"] == pytest.approx(2.0)
    assert full["energy_mae_mean"] is None
    table = markdown_tables(summary)
    assert "| full (unseen) | 50.0 ± 10.0 (2.00×) |" in table
    assert "| scratch | 100.0 ± 10.0 |" in table
    # a fine-tuning variant is compared with scratch fine-tuned the same way
    rows += [{"molecule": "m", "setting": "none", "model": "scratch", "n_train": 50, "seed": 0,
              "finetune": "lr1e-3", "force_mae": 60.0, "energy_mae": 1.0},
             {"molecule": "m", "setting": "unseen", "model": "full", "n_train": 50, "seed": 0,
              "finetune": "lr1e-3", "force_mae": 40.0, "energy_mae": 1.0}]
    summary = summarize(rows)
    full_v = next(s for s in summary if s["model"] == "full" and s["finetune"] == "lr1e-3")
    assert full_v["ratio_scratch_over_model"] == pytest.approx(1.5)
    assert next(s for s in summary if s["model"] == "full" and s["finetune"] == "default")[
        "ratio_scratch_over_model"] == pytest.approx(2.0)
    assert "| full (unseen) [lr1e-3] | 40.0 ± 0.0 (1.50×) [1 seed] |" in markdown_tables(summary)


def test_tiny_study_end_to_end_and_resume(tmp_path):
    cfg_dict = _config(tmp_path)
    cfg_dict["finetune"].update(n_train=[10], seeds=[0])
    cfg = load_study_config(_write(tmp_path, cfg_dict))
    out = run_study(cfg, phase="all", workers=2, progress=False)
    assert all(r["ok"] for r in out["pretrain"] + out["finetune"]), out
    assert status(cfg)["finetune"] == {"total": 4, "done": 4, "started": 0, "failed": 0}
    rows = json.loads((tmp_path / "study.json").read_text())
    assert {r["model"] for r in rows} == {"scratch", "forces_only", "full", "full_sigma0.1"}
    # the ablation's pre-training really used its own sigma
    pre = yaml.safe_load((tmp_path / "study/pretrain/unseen/full_sigma0.1/config.yaml").read_text())
    assert pre["loss"]["denoising"]["sigma"] == 0.1 and pre["loss"]["zero_force"] == 0.1
    assert (tmp_path / "figures" / "aspirin_n10_variants.png").stat().st_size > 0
    summary = json.loads((tmp_path / "study_summary.json").read_text())
    assert {p["model"] for p in summary["pretrain"]} == {"forces_only", "full", "full_sigma0.1"}
    for r in rows:
        for key in ("molecule", "setting", "model", "n_train", "seed", "force_mae", "energy_mae"):
            assert key in r
        assert r["molecule"] == "aspirin" and r["n_train"] == 10 and np.isfinite(r["force_mae"])
        assert r["force_mae"] > 1.0  # meV/A, not eV/A
        assert r["accelerator"] == "cpu"  # where the run ran (a study may be split across machines)
    assert (tmp_path / "figures" / "aspirin_unseen.png").stat().st_size > 0
    # the pre-trained weights are what the fine-tuning started from
    ft = yaml.safe_load((tmp_path / "study/finetune/aspirin/unseen/full/n10_seed0/config.yaml").read_text())
    assert ft["init_from"].endswith("pretrain/unseen/full/model.ckpt")
    again = run_study(cfg, phase="finetune", workers=2, progress=False)
    assert again["finetune"] == []  # nothing left to run
    # a new checkout without the run folders: the report keeps every measured row and pre-training
    # entry from the earlier report, and a run folder that is there replaces its row
    import shutil

    keep = tmp_path / "study" / "finetune" / "aspirin" / "unseen" / "full"
    metrics = json.loads((keep / "n10_seed0" / "metrics.json").read_text())
    metrics["test"]["force_mae"] = 1.234
    (keep / "n10_seed0" / "metrics.json").write_text(json.dumps(metrics))
    shutil.rmtree(tmp_path / "study" / "pretrain")
    for run in (tmp_path / "study" / "finetune").glob("*/*/*"):
        if run != keep:
            shutil.rmtree(run)
    run_study(cfg, phase="report", progress=False)
    after = json.loads((tmp_path / "study.json").read_text())
    assert [r for r in after if r["model"] != "full"] == [r for r in rows if r["model"] != "full"]
    assert [r["force_mae"] for r in after if r["model"] == "full"] == [1234.0]
    assert json.loads((tmp_path / "study_summary.json").read_text())["pretrain"] == summary["pretrain"]


def test_sigterm_stops_the_workers_too(tmp_path):
    """Killing `forcecentric study` (a timeout, a batch system) must not leave training processes
    running on without it: the run directory stops changing and resumes later."""
    import signal
    import subprocess
    import sys
    import time

    cfg = _config(tmp_path)
    cfg["pretrain"]["settings"]["unseen"] = ["forces_only"]
    cfg["pretrain"]["set"].update({"trainer.max_epochs": 500, "data.batch_size": 4, "trainer.log_every_n_steps": 1})
    path = _write(tmp_path, cfg)
    proc = subprocess.Popen([sys.executable, "-m", "forcecentric.cli", "study", "-c", str(path), "--phase",
                             "pretrain", "--workers", "1", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv_file = tmp_path / "study" / "pretrain" / "unseen" / "forces_only" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (csv_file.is_file() and csv_file.stat().st_size > 0):
        time.sleep(0.5)
    assert csv_file.is_file(), "the training job never started"
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    time.sleep(2)
    size = csv_file.stat().st_size
    time.sleep(4)
    assert csv_file.stat().st_size == size, "a worker kept training after the study was killed"


def test_tuned_summary_chooses_each_models_variant_on_validation_only():
    def row(model, ft, seed, val, test):
        setting = "none" if model == "scratch" else "unseen"
        return {"molecule": "m", "setting": setting, "model": model, "n_train": 50, "seed": seed, "finetune": ft,
                "val_force_mae": val, "force_mae": test, "energy_mae": 1.0}

    rows = []
    for seed in (0, 1):
        rows += [row("scratch", "default", seed, 100.0, 100.0), row("scratch", "lr1e-3", seed, 80.0, 70.0 + seed),
                 # full: the better test error sits with the worse validation error: not chosen
                 row("full", "default", seed, 50.0, 50.0), row("full", "lr1e-3", seed, 60.0, 40.0)]
    rows.append(row("scratch", "lr2e-3", 0, 10.0, 10.0))  # fewer seeds than the others: not a candidate
    rows.append(row("forces_only", "default", 0, 55.0, 55.0))  # one variant only: listed with it
    rows.append(row("scratch", "default", 0, 90.0, 90.0) | {"n_train": 100})  # a cell nobody swept: left out
    tuned = {t["model"]: t for t in tuned_summary(rows)}
    assert set(tuned) == {"scratch", "full", "forces_only"}
    assert {t["n_train"] for t in tuned.values()} == {50}
    assert tuned["forces_only"]["candidates"] == ["default"]
    assert tuned["forces_only"]["ratio_scratch_over_model"] == pytest.approx(70.5 / 55.0)
    assert tuned["scratch"]["finetune"] == "lr1e-3" and tuned["scratch"]["candidates"] == ["default", "lr1e-3"]
    assert tuned["scratch"]["force_mae_mean"] == pytest.approx(70.5)
    assert tuned["full"]["finetune"] == "default" and tuned["full"]["force_mae_mean"] == pytest.approx(50.0)
    assert tuned["full"]["ratio_scratch_over_model"] == pytest.approx(70.5 / 50.0)
    table = tuned_table(list(tuned.values()))
    assert "| m | 50 | full (unseen) | default | default, lr1e-3 (2 seeds) | 50.0 | 50.0 ± 0.0 (1.41×) |" in table


def test_geometry_benchmark_measures_bond_lengths_and_the_labels_push_along_them():
    """benchmarks/study_geometry.py: bond lengths per element pair, and the mean bond force, positive
    when the labels push a bond longer, from water frames with made-up forces."""
    import sys
    from pathlib import Path

    from forcecentric.data.conformation import Conformation

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from study_geometry import bond_statistics, bonds_of

    frames = []
    for k, stretch in enumerate((0.95, 1.00)):
        pos = np.array([[0.0, 0.0, 0.0], [stretch, 0.0, 0.0], [0.0, stretch, 0.0]])
        forces = np.array([[-0.3, -0.3, 0.0], [0.3, 0.0, 0.0], [0.0, 0.3, 0.0]]) * (1 - 2 * k)  # apart, then together
        frames.append(Conformation(z=np.array([8, 1, 1]), pos=pos, energy=0.0, forces=forces))
    bonds = bonds_of(frames[0])
    assert sorted(k for _, _, k in bonds) == ["H-O", "H-O"]  # no H-H bond at 1.34-1.41 A
    stats = bond_statistics(frames, bonds)["H-O"]
    assert stats["length_mean"] == pytest.approx(0.975) and stats["length_std"] == pytest.approx(0.025)
    assert stats["bond_force_mean_meV_A"] == pytest.approx(0.0, abs=1e-9)  # +300 and -300 meV/A
    assert stats["bond_force_sem_meV_A"] == pytest.approx(300.0 / np.sqrt(2))
    assert bond_statistics(frames[:1], bonds)["H-O"]["bond_force_mean_meV_A"] == pytest.approx(300.0)


def test_geometry_benchmark_finds_and_measures_a_torsion():
    """study_geometry's torsion: the first bonded chain of the given elements, and its |angle| in 0-180."""
    import sys
    from pathlib import Path

    from ase.build import molecule

    from forcecentric.data.conformation import Conformation

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from study_geometry import abs_dihedral, dihedral_path

    atoms = molecule("CH3CH2OH")
    rec = Conformation(z=atoms.numbers, pos=atoms.positions)
    path = dihedral_path(rec, ["H", "O", "C", "C"])
    assert path is not None and atoms.get_chemical_symbols()[path[1]] == "O"
    for angle in (60.0, 180.0, 300.0):
        atoms.set_dihedral(*path[::-1], angle, indices=[path[0]])  # turns the hydroxyl H, the chain's last atom
        rec = Conformation(z=atoms.numbers, pos=atoms.positions)
        assert abs_dihedral(rec, path) == pytest.approx(min(angle, 360 - angle), abs=1e-6)
    assert dihedral_path(rec, ["N", "O", "C", "C"]) is None


def test_corpus_conformer_benchmark_counts_minima_and_reads_the_corpus_minimum():
    """benchmarks/corpus_conformers.py: distinct MMFF and GFN2-xTB minima of one molecule with and
    without the labeller's screen, and the corpus's own minimum energy of a molecule it holds."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from corpus_conformers import corpus_minima, one_molecule

    row = one_molecule("water", "O", seed=0)
    assert (row["mmff_minima_9"], row["mmff_minima_50"]) == (1, 1)
    for key in ("embedding_order", "screened"):
        assert row[key]["xtb_minima"] == 1 and row[key]["energies_above_lowest_eV"] == [0.0]
    assert row["screened"]["lowest_energy_eV"] == pytest.approx(row["embedding_order"]["lowest_energy_eV"], abs=1e-4)
    assert row["screened"]["stereoisomers"] == ["O"]
    found = corpus_minima({"freesolv_2": "C=CC(C)C", "solubility_1201": "NC(Cc1ccc(O)cc1)C(=O)O",
                           "not-in-the-corpus": "C"})
    assert sorted(found) == ["freesolv_2", "solubility_1201"]
    energy, isomers = found["freesolv_2"]
    assert -600 < energy < -100 and isomers == {"C=CC(C)C"}  # C5H10, GFN2-xTB eV; achiral
    # tyrosine's one open stereocentre: the corpus minimum's stereoisomer and its mirror image
    assert found["solubility_1201"][1] == {"N[C@@H](Cc1ccc(O)cc1)C(=O)O", "N[C@H](Cc1ccc(O)cc1)C(=O)O"}


def test_corpus_bond_benchmark_measures_stretch_from_the_minimum():
    """benchmarks/corpus_bonds.py: each frame's bond lengths against the molecule's minimum, and the
    labels' bond force, averaged per kind of frame and bond type."""
    import sys
    from collections import defaultdict
    from pathlib import Path

    from forcecentric.data.conformation import Conformation

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from corpus_bonds import LAYOUT, bond_shifts, summarize

    assert len(LAYOUT) == 22 and LAYOUT.count("nm 1000 K") == 5  # the bundled corpus's CORPUS.md
    z = np.array([8, 1, 1])
    minimum = Conformation(z=z, pos=np.array([[0.0, 0, 0], [0.96, 0, 0], [0, 0.96, 0]]), equilibrium=True)
    frames = [Conformation(z=z, pos=np.array([[0.0, 0, 0], [0.96 + d, 0, 0], [0, 0.96, 0]]), energy=0.0,
                           forces=np.array([[f, 0, 0], [-f, 0, 0], [0, 0, 0]])) for d, f in ((0.04, 0.5), (0.02, 0.3))]
    acc = defaultdict(lambda: defaultdict(list))
    bond_shifts(minimum, frames, ["nm", "nm"], acc)
    stats = summarize(acc)["nm"]["H-O"]
    assert stats["n"] == 4  # two bonds in each of two frames
    assert stats["stretch_mean_A"] == pytest.approx(0.015)  # (0.04 + 0 + 0.02 + 0) / 4
    assert stats["bond_force_mean_meV_A"] == pytest.approx(-200.0)  # labels pull the stretched bond in


def test_study_gap_rerun_keeps_models_whose_checkpoints_are_gone():
    """benchmarks/study_gap.py updates its results file: models evaluated now replace their earlier
    numbers, models evaluated only before are kept and named, and a file of other settings is
    refused rather than mixed in."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from study_gap import check_mergeable, merge_previous

    def result(zero_shot: dict[str, float], evaluated_now: list[str] | None = None) -> dict:
        out = {"config": "study_paper", "n_frames": 100, "targets": {
            "ethanol": {"xtb_vs_dft_force_mae": 334.0,
                        "zero_shot": {m: {"vs_dft": v, "vs_xtb": v / 5} for m, v in zero_shot.items()}}},
            "held_out_at_corpus_level": {"zero_shot_force_mae": dict(zero_shot)}}
        if evaluated_now is not None:
            out["evaluated_now"] = evaluated_now
        return out

    old = result({"unseen/a": 300.0, "unseen/b": 310.0})
    old["targets"]["3BPA"] = {"zero_shot": {"unseen/a": {"vs_dft": 190.0, "vs_xtb": 80.0}}}
    new = result({"unseen/b": 320.0, "unseen/c": 330.0}, ["unseen/b", "unseen/c"])
    new["targets"]["ethanol_xtb"] = {"same_test_frames_as": "ethanol"}
    merged = merge_previous(new, old)
    zs = merged["targets"]["ethanol"]["zero_shot"]
    assert {m: v["vs_dft"] for m, v in zs.items()} == {"unseen/a": 300.0, "unseen/b": 320.0, "unseen/c": 330.0}
    assert merged["held_out_at_corpus_level"]["zero_shot_force_mae"] == {
        "unseen/a": 300.0, "unseen/b": 320.0, "unseen/c": 330.0}
    assert merged["targets"]["3BPA"] == old["targets"]["3BPA"]  # a target not evaluated now is kept
    assert merged["targets"]["ethanol_xtb"] == {"same_test_frames_as": "ethanol"}
    assert merged["kept_from_earlier_runs"] == ["unseen/a"]
    assert new["targets"]["ethanol"]["zero_shot"].keys() == {"unseen/b", "unseen/c"}  # inputs untouched
    merged["targets"]["3BPA"]["zero_shot"]["unseen/a"]["vs_dft"] = 0.0
    assert old["targets"]["3BPA"]["zero_shot"]["unseen/a"]["vs_dft"] == 190.0

    with pytest.raises(ValueError, match="n_frames=50"):
        check_mergeable(new, {**old, "n_frames": 50}, "gap.json")
    with pytest.raises(ValueError, match="config='study'"):
        merge_previous(new, {**old, "config": "study"})
