"""Last-layer feature Jacobians G_j = ∂Φ/∂r_j of trained plain models, for the LLPR baseline
(:mod:`e2ip_plugins.llpr`): Φ = Σ_i φ_i, φ_i the inputs of the model's final linear energy map.

- MACE: the ``0e`` channels read by each linear readout and the hidden activations of the non-linear
  readout (E = Σ_i wᵀφ_i up to MACE's constant scale and shift).
- NequIP: the scalar node features entering ``per_atom_energy_readout`` (a linear map when
  ``readout_mlp_hidden_layers_depth`` is 0, the NequIP default), times the per-type energy scale
  (so E = Σ_i wᵀφ_i + shifts).

One forward without forces, then P backward passes per structure (P = number of features).
"""

from __future__ import annotations

from typing import List, Sequence

import torch


def _grads(phi: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(N, P, 3): ∂Φ_p/∂r_j for every feature p (P backward passes)."""
    rows = [torch.autograd.grad(phi[p], pos, retain_graph=p < len(phi) - 1)[0] for p in range(len(phi))]
    return torch.stack(rows, 1).detach().to(torch.float64)


def mace_feature_hooks(model):
    """Forward hooks collecting MACE's last-layer features φ_i (list filled on each forward), and the hooks."""
    from e3nn import o3

    feats: List[torch.Tensor] = []
    hooks = []
    for ro in model.readouts:
        if hasattr(ro, "non_linearity"):
            hooks.append(ro.non_linearity.register_forward_hook(lambda mod, inp, out: feats.append(out)))
        else:
            n0 = sum(mul for mul, ir in o3.Irreps(str(ro.linear.irreps_in)) if ir.l == 0)
            hooks.append(ro.register_forward_hook(lambda mod, inp, out, n0=n0: feats.append(inp[0][:, :n0])))
    return feats, hooks


def mace_jacobians(model, loader) -> torch.Tensor:
    """G_j (N, P, 3) over a MACE loader (one structure per batch), atoms in loader order."""
    feats, hooks = mace_feature_hooks(model)
    out = []
    try:
        for batch in loader:
            data = batch.to_dict()
            feats.clear()
            model(data, training=False, compute_force=False)
            out.append(_grads(torch.cat(feats, dim=1).sum(0), data["positions"]))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(out)


def nequip_jacobians(calc, frames: Sequence) -> torch.Tensor:
    """G_j (N, P, 3) for a NequIP ``NequIPCalculator`` (eager model) over ASE ``frames``."""
    from nequip.data import AtomicDataDict
    from nequip.nn import ForceStressOutput

    fso = next(m for m in calc.model.modules() if isinstance(m, ForceStressOutput))
    seq = fso.func
    readout = seq._modules["per_atom_energy_readout"]
    scale_shift = seq._modules["per_type_energy_scale_shift"]
    if getattr(readout, "mlp_module", None) is not None and len(readout.mlp_module.dims) > 2:
        raise ValueError("LLPR features: a NequIP readout with hidden layers is not supported here")
    captured: List[torch.Tensor] = []
    hook = readout.register_forward_pre_hook(lambda mod, args: captured.append(args[0][AtomicDataDict.NODE_FEATURES_KEY]))
    dtype = next(calc.model.parameters()).dtype
    out = []
    try:
        for atoms in frames:
            data = calc.atoms_to_data(atoms)
            data = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in data.items()}
            data[AtomicDataDict.POSITIONS_KEY] = data[AtomicDataDict.POSITIONS_KEY].detach().requires_grad_(True)
            captured.clear()
            seq(data)
            types = data[AtomicDataDict.ATOM_TYPE_KEY].view(-1)
            scales = scale_shift.scales if scale_shift.has_scales else None
            phi = captured[0]
            if scales is not None:
                phi = phi * (scales[types].view(-1, 1) if scales.numel() > 1 else scales.view(1, 1))
            out.append(_grads(phi.sum(0), data[AtomicDataDict.POSITIONS_KEY]))
    finally:
        hook.remove()
    return torch.cat(out)
