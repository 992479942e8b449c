"""The force-centric objectives (Feng et al., NeurIPS 2023).

* force matching on off-equilibrium conformations with reference forces,
* zero-force regularization on equilibrium conformations (predicted forces at a minimum vanish),
* force-based denoising on equilibrium conformations (perturb the minimum; the force that pulls
  it back is the target),
* optionally an energy term where the data has consistent energies (fine-tuning).

One function per term; each returns the mean over the atoms (or molecules) it applies to and is
exactly zero-weighted when no sample in the batch qualifies. :func:`make_views` turns a batch into
the structures the model has to evaluate (off-equilibrium frames, clean minima, noisy minima),
and :func:`total_loss` combines the model outputs on those views into the weighted sum.
Nothing here knows about Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DenoiseConfig, LossConfig
from .data.dataset import Batch


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the rows selected by ``mask`` (0 when none; keeps the graph)."""
    n = mask.sum()
    if int(n) == 0:
        return values.sum() * 0.0
    return values[mask].sum() / n


def force_matching_loss(pred: torch.Tensor, ref: torch.Tensor, atom_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the selected atoms of ||F_pred - F_ref||^2 (eV^2/A^2)."""
    return _masked_mean(((pred - ref) ** 2).sum(-1), atom_mask)


def zero_force_loss(pred: torch.Tensor, atom_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the selected atoms of ||F_pred||^2: zero exactly when those forces are zero."""
    return _masked_mean((pred**2).sum(-1), atom_mask)


def denoising_target(noise: torch.Tensor, cfg: DenoiseConfig) -> torch.Tensor:
    """Restoring-force target for a displacement ``x~ - x0 = sigma * eps`` (``noise = eps``).

    It always points back to the unperturbed geometry (opposite to the displacement).
    """
    if cfg.target == "harmonic":
        return -cfg.kappa * cfg.sigma * noise
    if cfg.target == "eps":
        return -cfg.kappa * noise
    return -cfg.kappa * noise / cfg.sigma**2  # eps_over_sigma2


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, atom_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the selected atoms of ||pred - target||^2."""
    return force_matching_loss(pred, target, atom_mask)


def energy_loss(
    pred: torch.Tensor, ref: torch.Tensor, n_atoms: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over the selected molecules of the squared per-atom energy error (eV^2/atom^2)."""
    err = (pred - ref.to(pred.dtype)) / n_atoms.to(pred.dtype)
    err = torch.where(mask, err, torch.zeros_like(err))  # NaN labels of unlabelled molecules
    return _masked_mean(err**2, mask)


@dataclass
class Views:
    """Structures to evaluate for one batch, with the masks and targets of each loss term.

    ``batch`` concatenates: the original batch (all samples, positions unchanged), then, if
    denoising is on, a copy of the equilibrium samples with noisy positions.
    """

    batch: Batch
    force_atoms: torch.Tensor  # [N'] off-equilibrium atoms with reference forces
    zero_atoms: torch.Tensor  # [N'] atoms of unperturbed minima
    denoise_atoms: torch.Tensor  # [N'] atoms of perturbed minima
    denoise_target: torch.Tensor  # [N', 3] (zeros outside denoise_atoms)
    energy_graphs: torch.Tensor  # [B'] molecules whose energy enters the energy loss


def make_views(batch: Batch, cfg: LossConfig, generator: torch.Generator | None = None) -> Views:
    """Build the structures and masks the force-centric loss needs for ``batch``."""
    eq = batch.equilibrium
    labelled = batch.has_forces & ~eq
    parts = [batch]
    n = batch.z.shape[0]
    force_atoms = batch.atom_mask(labelled)
    zero_atoms = batch.atom_mask(eq) if cfg.zero_force > 0 else torch.zeros_like(force_atoms)
    energy_graphs = batch.has_energy & ~eq if cfg.energy > 0 else torch.zeros_like(eq)
    target = torch.zeros_like(batch.pos)
    denoise_atoms = torch.zeros_like(force_atoms)
    if cfg.denoise > 0 and bool(eq.any()):
        noisy = batch.select(eq)
        gen_device = generator.device if generator is not None else noisy.pos.device
        eps = torch.randn(
            noisy.pos.shape, generator=generator, device=gen_device, dtype=noisy.pos.dtype
        ).to(noisy.pos.device)
        noisy.pos = noisy.pos + cfg.denoising.sigma * eps
        noisy.has_energy = torch.zeros_like(noisy.has_energy)
        parts.append(noisy)
        m = noisy.z.shape[0]
        pad_false = torch.zeros(m, dtype=torch.bool, device=force_atoms.device)
        force_atoms = torch.cat([force_atoms, pad_false])
        zero_atoms = torch.cat([zero_atoms, pad_false])
        denoise_atoms = torch.cat([torch.zeros(n, dtype=torch.bool, device=eq.device), ~pad_false])
        target = torch.cat([target, denoising_target(eps, cfg.denoising)])
        energy_graphs = torch.cat([energy_graphs, torch.zeros_like(noisy.has_energy)])
    full = Batch.concat(parts) if len(parts) > 1 else batch
    return Views(full, force_atoms, zero_atoms, denoise_atoms, target, energy_graphs)


def total_loss(out: dict[str, torch.Tensor], views: Views, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Weighted sum of the terms; returns ``{"loss", "force", "zero_force", "denoise", "energy"}``.

    Each term is averaged over the samples it applies to; weights of zero drop the term.
    Denoising is matched by the forces, or by ``out["noise_pred"]`` when the config routes it
    through a separate head.
    """
    b = views.batch
    forces = out["forces"]
    terms: dict[str, torch.Tensor] = {}
    zero = forces.sum() * 0.0
    terms["force"] = force_matching_loss(forces, b.forces, views.force_atoms) if cfg.force > 0 else zero
    terms["zero_force"] = zero_force_loss(forces, views.zero_atoms) if cfg.zero_force > 0 else zero
    if cfg.denoise > 0:
        if cfg.denoising.through == "head":
            if "noise_pred" not in out:
                raise ValueError("loss.denoising.through='head' needs model.denoise_head: true")
            pred = out["noise_pred"]
        else:
            pred = forces
        terms["denoise"] = denoising_loss(pred, views.denoise_target, views.denoise_atoms)
    else:
        terms["denoise"] = zero
    if cfg.energy > 0:
        terms["energy"] = energy_loss(out["energy"], b.energy, b.n_atoms, views.energy_graphs)
    else:
        terms["energy"] = zero
    terms["loss"] = (
        cfg.force * terms["force"]
        + cfg.zero_force * terms["zero_force"]
        + cfg.denoise * terms["denoise"]
        + cfg.energy * terms["energy"]
    )
    return terms
