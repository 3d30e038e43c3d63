"""The e²IP head on scalar-only MACE backbones (issue 28): the geometric construction on the last product
block's scalars (mace_ext.geometric). In-process tiny models, one end-to-end ``mace_run_train_e2ip --max_L 0``."""

from copy import deepcopy

import ase
import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list

from mace import data
from mace.tools import torch_geometric, utils
from mace_ext import E2IPMACECalculator
from mace_ext.geometric import NoGeometricFeatures, edge_geometry
from mace_ext.model import attach_e2ip_head

from .helpers import Z, first_molecule, random_rotation, tiny_mace
from .test_cli import _train

R_MAX = 4.0


def _batch(atoms):
    ad = data.AtomicData.from_config(data.config_from_atoms(atoms), z_table=utils.AtomicNumberTable(Z), cutoff=R_MAX)
    return torch_geometric.Batch.from_data_list([ad]).to_dict()


def _model(max_L=0, geometric=False, seed=0):
    torch.manual_seed(seed)
    return attach_e2ip_head(tiny_mace(max_L), force_rms=1.1, num_channels=4, mlp_hidden=8, geometric=geometric)


@pytest.mark.parametrize("max_L, geometric", [(0, False), (1, True)], ids=["L0", "L1_geometric"])
def test_covariance_spd_rotates_and_permutes(f64, max_L, geometric):
    model = _model(max_L, geometric)
    assert model.e2ip_config()["geometric"] and model.e2ip_feature_block == 1  # the last product block
    assert model.e2ip_irreps == "8x0e+8x1o+8x2e"
    mol = first_molecule()
    out = model(_batch(mol))
    cov = out["forces_covariance"].detach()
    assert torch.allclose(cov, cov.transpose(1, 2)) and (torch.linalg.eigvalsh(cov) > 0).all()
    assert torch.linalg.eigvalsh(cov).std(dim=-1).max() > 1e-6  # anisotropic, not a multiple of I
    for seed in (1, 2):
        rot = random_rotation(seed)
        turned = mol.copy()
        turned.positions = mol.positions @ rot.numpy().T
        torch.testing.assert_close(model(_batch(turned))["forces_covariance"].detach(), rot @ cov @ rot.T,
                                   rtol=1e-9, atol=1e-12)
    perm = np.random.default_rng(0).permutation(len(mol))
    got = model(_batch(mol[perm]))["forces_covariance"].detach()
    torch.testing.assert_close(got, cov[perm], rtol=1e-9, atol=1e-12)


def test_compiled_equals_eager_and_old_pickles_load(f64, tmp_path):
    from e3nn.util import jit

    model = _model(0)
    mol = first_molecule()
    mol.positions += 0.05 * np.random.default_rng(1).standard_normal(mol.positions.shape)
    ref = model(_batch(mol))
    compiled = jit.compile(deepcopy(model))
    got = compiled(_batch(mol))
    for key in ("energy", "forces", "forces_covariance", "forces_uncertainty", "energy_uncertainty", "e2ip_sigma0"):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-10, msg=key)
    # a .model pickled before issue 28 (no e2ip_geometric): loads with the geometric construction off
    old = _model(1)
    del old._modules["e2ip_geometric"]
    del old.e2ip_geometric_enabled
    torch.save(old, tmp_path / "old.model")
    loaded = torch.load(tmp_path / "old.model", weights_only=False)
    assert isinstance(loaded.e2ip_geometric, NoGeometricFeatures) and not loaded.e2ip_config()["geometric"]
    assert loaded(_batch(mol))["forces_covariance"].shape == (len(mol), 3, 3)


def _cell():
    """A small triclinic periodic cell (edge lengths < r_max): periodic images and self-images are neighbours."""
    cell = np.array([[3.1, 0.0, 0.0], [0.4, 2.9, 0.0], [0.3, -0.5, 3.3]])
    frac = np.array([[0.0, 0.0, 0.0], [0.45, 0.2, 0.1], [0.3, 0.7, 0.55], [0.8, 0.4, 0.85]])
    return ase.Atoms("HCOH", scaled_positions=frac, cell=cell, pbc=True)


def test_periodic_edge_vectors_match_ase(f64):
    """MACE's edges, oriented by edge_geometry, give the features of ASE's list (centre i, neighbour j,
    D = r_j − r_i + S·cell); the opposite sign (r_centre − r_neighbour) does not."""
    atoms = _cell()
    batch = _batch(atoms)
    assert batch["shifts"].abs().sum() > 0  # periodic images are in the graph
    center, neighbor, vectors = edge_geometry(batch)
    i, j, d = neighbor_list("ijD", atoms, R_MAX)
    assert len(i) == len(center) and (i == j).any()  # self-images too
    key = lambda c, n, v: sorted(zip(c.tolist(), n.tolist(), np.round(v, 8).tolist()))  # noqa: E731
    assert key(center, neighbor, vectors.numpy()) == key(i, j, d)
    model = _model(0)
    torch.manual_seed(3)
    h = torch.randn(len(atoms), model.e2ip_geometric.num_scalars)
    ours = model.e2ip_geometric(h, center, neighbor, vectors)
    ref = model.e2ip_geometric(h, torch.as_tensor(i), torch.as_tensor(j), torch.as_tensor(d))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    flipped = model.e2ip_geometric(h, center, neighbor, -vectors)
    assert (flipped - ref).abs().max() > 1e-3
    # the whole model on the periodic cell: SPD, and the cell rotated with it gives R U Rᵀ
    cov = model(batch)["forces_covariance"].detach()
    assert (torch.linalg.eigvalsh(cov) > 0).all()
    rot = random_rotation(4)
    turned = atoms.copy()
    turned.set_cell(atoms.cell.array @ rot.numpy().T, scale_atoms=True)
    torch.testing.assert_close(model(_batch(turned))["forces_covariance"].detach(), rot @ cov @ rot.T,
                               rtol=1e-9, atol=1e-12)


def test_calculator_reports_covariance(f64, tmp_path):
    path = tmp_path / "l0.model"
    torch.save(_model(0), path)
    calc = E2IPMACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")
    mol = first_molecule()
    mol.calc = calc
    mol.get_forces()
    cov = calc.results["forces_covariance"]
    assert cov.shape == (len(mol), 3, 3) and (np.linalg.eigvalsh(cov) > 0).all()


def test_cli_max_L0_end_to_end(tmp_path):
    """``mace_run_train_e2ip --max_L 0`` (1 epoch, 16 frames): both files; the calculator reports the covariance.
    The same run carries the opt-in in-model committee (``--e2ip_committee 3``, issue 26) through MACE's run: its
    members are in the saved and the compiled model's outputs."""
    proc, work = _train(tmp_path, "--max_L", "0", "--e2ip_committee", "3", epochs=1)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "geometric construction on the scalars of product block 1" in log
    assert "Traceback" not in log
    model = torch.load(work / "iso7_e2ip.model", weights_only=False)
    assert model.e2ip_config()["geometric"] and float(model.e2ip_novelty.novelty_calib[0]) != 1.0  # fitted
    assert model.e2ip_config()["committee_members"] == 3 and "committee_weight=0.01" in log
    compiled = torch.jit.load(str(work / "iso7_e2ip_compiled.model"))
    mol = first_molecule()
    batch = _batch(mol)
    dtype = next(compiled.parameters()).dtype
    batch = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in batch.items()}
    assert compiled(batch)["e2ip_committee_forces"].shape == (len(mol), 3, 3)
    calc = E2IPMACECalculator(model_paths=str(work / "iso7_e2ip.model"), device="cpu", default_dtype="float64")
    mol.calc = calc
    mol.get_potential_energy()
    assert calc.results["forces_covariance"].shape == (len(mol), 3, 3)
    assert np.isfinite(calc.results["forces_uncertainty"]).all()
