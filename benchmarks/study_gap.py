"""How far apart are the pre-training labels (GFN2-xTB) and the DFT targets of the study?

For 100 test frames of each DFT target of a study config (`configs/study.yaml` by default) this
computes GFN2-xTB forces (tblite) at the DFT geometries and compares them with the DFT forces, and
evaluates every pre-trained model of the study before any fine-tuning ("zero-shot") against both.
It also evaluates every model on a molecule held out of the corpus at the corpus's own level of
theory, the bundled aspirin frames (GFN2-xTB, 400 frames): what the pre-training learned about
unseen chemistry, with no level-of-theory gap. Writes benchmarks/results/study_gap.json (or --out).

Pre-trained checkpoints live under the study's run folder, which does not travel with the
repository. A rerun therefore updates the results file instead of replacing it: models evaluated
now overwrite their earlier numbers, and models whose checkpoints are gone keep theirs. Targets
whose test frames are another target's (same file content) are listed once, with a pointer.

    python benchmarks/study_gap.py            # after `forcecentric study --phase pretrain`
    python benchmarks/study_gap.py -c study_paper --out benchmarks/results/study_paper_gap.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from forcecentric.checkpoint import load
from forcecentric.data import read_all
from forcecentric.data.label import xtb_calculator
from forcecentric.evaluation import predict, write_json
from forcecentric.provenance import machine_info
from forcecentric.study import load_study_config, pretrain_jobs
from forcecentric.train.datamodule import resolve_path

N_FRAMES = 100
HELD_OUT_XTB = "bundled:demo_target"  # aspirin, held out of the bundled corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default="study", help="study config (YAML file or preset name)")
    ap.add_argument("--out", default="benchmarks/results/study_gap.json", help="results JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_study_config(args.config)
    out: dict = {"machine": machine_info("cpu"), "config": args.config, "n_frames": N_FRAMES,
                 "units": "meV/A (forces), meV (energies)", "targets": {}}
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else None
    if previous is not None:  # before the evaluations, so that a wrong --out costs nothing
        check_mergeable(out, previous, args.out)
    # each pre-trained model loaded once, evaluated on every target and on the held-out xTB frames
    models = {f"{j.key['setting']}/{j.key['model']}": load(j.run_dir / "model.ckpt")
              for j in pretrain_jobs(cfg) if j.done}
    out["evaluated_now"] = sorted(models)
    seen: dict[str, str] = {}  # test file digest -> the first target with those frames
    for target, tc in cfg.targets.items():
        if "DFT" not in tc.kind:
            continue
        test_file = Path(cfg.out) / "targets" / target / "test.extxyz"
        digest = hashlib.sha256(test_file.read_bytes()).hexdigest()
        if digest in seen:
            out["targets"][target] = {"same_test_frames_as": seen[digest]}
            continue
        seen[digest] = target
        recs = read_all(test_file)[:N_FRAMES]
        f_xtb, e_xtb = [], []
        for r in recs:
            atoms = r.to_atoms()
            atoms.calc = xtb_calculator()
            f_xtb.append(atoms.get_forces())
            e_xtb.append(atoms.get_potential_energy())
        f_xtb = np.concatenate(f_xtb)
        f_dft = np.concatenate([r.forces for r in recs])
        de = np.array(e_xtb) - np.array([r.energy for r in recs])
        row = {
            "dft_force_mean_abs": 1000 * float(np.abs(f_dft).mean()),
            "xtb_vs_dft_force_mae": 1000 * float(np.abs(f_xtb - f_dft).mean()),
            "xtb_vs_dft_energy_mae_offset_removed": 1000 * float(np.abs(de - de.mean()).mean()),
            "zero_shot": {},
        }
        for name, model in models.items():
            pred = np.concatenate(predict(model, recs)[1])
            row["zero_shot"][name] = {
                "vs_dft": 1000 * float(np.abs(pred - f_dft).mean()),
                "vs_xtb": 1000 * float(np.abs(pred - f_xtb).mean()),
            }
        out["targets"][target] = row
        print(target, json.dumps({k: v for k, v in row.items() if k != "zero_shot"}))
    recs = read_all(resolve_path(HELD_OUT_XTB))
    f_ref = np.concatenate([r.forces for r in recs])
    held = {"data": HELD_OUT_XTB, "molecules": sorted({r.mol_id for r in recs}), "n_frames": len(recs),
            "force_mean_abs": 1000 * float(np.abs(f_ref).mean()), "zero_shot_force_mae": {}}
    for name, model in models.items():
        pred = np.concatenate(predict(model, recs)[1])
        held["zero_shot_force_mae"][name] = 1000 * float(np.abs(pred - f_ref).mean())
    out["held_out_at_corpus_level"] = held
    print(HELD_OUT_XTB, json.dumps(held["zero_shot_force_mae"]))
    if previous is not None:
        out = merge_previous(out, previous)
    write_json(out, args.out)


def check_mergeable(new: dict, old: dict, where: str = "the results file") -> None:
    """Raise unless ``old`` holds results of the same study config and frame count as ``new``."""
    for key in ("config", "n_frames"):
        if old.get(key) != new.get(key):
            raise ValueError(f"{where} holds results with {key}={old.get(key)!r}, this run has "
                             f"{new.get(key)!r}: pass another --out")


def merge_previous(new: dict, old: dict) -> dict:
    """``new`` with the zero-shot numbers of ``old`` that ``new`` lacks: models evaluated in ``new``
    win, models only in ``old`` (their checkpoints gone) are kept. Only results of the same study
    config and frame count are merged; anything else raises, so that numbers of different
    settings never mix in one file."""
    check_mergeable(new, old)
    merged = json.loads(json.dumps(new))
    earlier = set(old.get("held_out_at_corpus_level", {}).get("zero_shot_force_mae", {}))
    for target, old_row in old.get("targets", {}).items():
        earlier |= set(old_row.get("zero_shot", {}))
        row = merged["targets"].get(target)
        if row is None:  # a target not evaluated now
            merged["targets"][target] = json.loads(json.dumps(old_row))
        elif "zero_shot" in row:
            row["zero_shot"] = {**old_row.get("zero_shot", {}), **row["zero_shot"]}
    merged["kept_from_earlier_runs"] = sorted(earlier - set(new.get("evaluated_now", [])))
    old_held = old.get("held_out_at_corpus_level")
    if old_held is not None:
        held = merged["held_out_at_corpus_level"]
        held["zero_shot_force_mae"] = {**old_held.get("zero_shot_force_mae", {}),
                                       **held["zero_shot_force_mae"]}
    return merged


if __name__ == "__main__":
    main()
