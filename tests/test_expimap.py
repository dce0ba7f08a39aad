"""expiMap: the program mask, the proximal steps, masked training, mapping, and the published
interferon demonstration."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import assert_unchanged, grown_columns_only, make_adata, snapshot

import scanpy_scvi as ss
from scanpy_scvi.nn import ProgramVAE

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = {"hidden_layer_sizes": (32,)}


def _programs(adata, n=4, size=15, seed=0):
    rng = np.random.default_rng(seed)
    return {f"HALLMARK_P{k}": list(rng.choice(adata.var_names, size, replace=False)) for k in range(n)}


def test_gmt_reader_and_mask(tmp_path):
    data = make_adata(n_obs=20, n_vars=40)
    genes = list(data.var_names)
    gmt = tmp_path / "p.gmt"
    gmt.write_text(
        "HALLMARK_BIG\thttp://x\t" + "\t".join(g.lower() for g in genes[:14]) + "\n"  # case-insensitive match
        "HALLMARK_SMALL\tdesc\t" + "\t".join(genes[:12]) + "\n"  # 12 genes: not more than min_genes
        "HALLMARK_FOREIGN\tdesc\t" + "\t".join(f"NOPE{i}" for i in range(30)) + "\n"
    )
    assert ss.tl.read_gmt(gmt)["HALLMARK_SMALL"] == genes[:12]
    snap = snapshot(data)
    out = ss.tl.add_gene_programs(data, gmt, min_genes=12, clean=True, copy=True)
    assert_unchanged(data, snap)
    assert list(out.uns["terms"]) == ["BIG"]
    mask = out.varm["I"]
    assert mask.shape == (40, 1) and mask[:14, 0].all() and mask[14:, 0].sum() == 0
    with pytest.raises(ValueError, match="more than min_genes"):
        ss.tl.add_gene_programs(data, {"A": genes[:3]}, min_genes=12)


def test_proximal_step_is_the_closed_form():
    m = ProgramVAE(4, n_latent=3, soft_mask=True, **SMALL)
    w = torch.tensor([[3.0, 0.1, 1.0], [4.0, 0.1, -2.0], [0.0, 0.1, 0.5], [0.0, 0.1, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]])  # entry (2, 2) is out of the mask
    with torch.no_grad():
        m.decoder.programs.copy_(w)
    m.decoder.mask.copy_(mask)
    m.proximal_step(group_threshold=1.0, l1_threshold=0.2)
    got = m.decoder.programs
    # column 0: norm 5 -> scaled by 1 - 1/5; column 1: norm 0.2 < 1 -> zero
    assert torch.allclose(got[:, 0], w[:, 0] * 0.8)
    assert torch.all(got[:, 1] == 0)
    # column 2: the out-of-mask 0.5 is soft-thresholded to 0.3 first, then the group step
    col = torch.tensor([1.0, -2.0, 0.3, 0.0])
    assert torch.allclose(got[:, 2], col * (1 - 1.0 / col.norm()))
    assert m.active_programs().tolist() == [True, False, True]


@pytest.fixture(scope="module")
def fitted():
    data = make_adata(n_obs=300, n_batches=2)
    ss.tl.add_gene_programs(data, _programs(data), min_genes=12)
    model = ss.pp.expimap(data, condition_key="batch", use_highly_variable_genes=False, max_epochs=10,
                          return_model=True, progress_bar=False, **SMALL)  # fmt: skip
    return data, model


def test_masked_weights_stay_exactly_zero(fitted):
    data, model = fitted
    mask = torch.as_tensor(np.asarray(data.varm["I"]), dtype=torch.float32)
    assert torch.equal(model.module.decoder.mask, mask)
    assert torch.all(model.module.decoder.programs[mask == 0] == 0)
    assert torch.any(model.module.decoder.programs[mask == 1] != 0)


def test_pp_expimap_writes_program_activities(fitted):
    data, model = fitted
    assert data.obsm["X_expimap"].shape == (data.n_obs, 4)
    table = data.uns["expimap"]["programs"]
    assert list(table.index) == list(data.uns["terms"]) and set(table.columns) == {
        "active",
        "direction",
        "direction_confidence",
        "n_genes",
    }
    assert (table["n_genes"] == 15).all()
    genes = model.term_genes("HALLMARK_P0")
    assert genes["in_mask"].all() and len(genes) <= 15 and genes["weights"].abs().is_monotonic_decreasing
    active = model.get_latent_representation(only_active=True)
    assert active.shape[1] == int(table["active"].sum())


def test_directions_and_their_confidence_are_the_closed_form(fitted):
    _data, model = fitted
    w = model.module.decoder.all_weights().detach().numpy()
    table = model.programs()
    np.testing.assert_array_equal(table["direction"], np.sign(w.sum(0)))
    np.testing.assert_allclose(table["direction_confidence"], np.abs(w.sum(0)) / np.abs(w).sum(0), rtol=1e-6)


def test_enrichment_flips_by_direction_and_flags_a_coin_flip_sign(fitted, tmp_path):
    """The cells of the top and bottom tenth of one program's activity: that program's Bayes
    factor is strong; directions flip factors' signs and nothing else; when the program's gene
    weights cancel, its sign is flagged as a coin flip."""
    data, model = fitted
    model.save(tmp_path / "m")
    model = ss.EXPIMAP.load(tmp_path / "m", adata=data)  # a copy whose decoder this test may change
    k, name = 2, "HALLMARK_P2"
    z = model.get_latent_representation(data)[:, k]
    low, high = np.quantile(z, [0.1, 0.9])
    data = data.copy()
    data.obs["split"] = np.where(z > high, "high", np.where(z < low, "low", "middle"))
    args = {"groupby": "split", "comparison": "low", "groups": ["high"], "model": model}
    plain = ss.tl.gene_program_enrichment(data, use_directions=False, **args).set_index("program")
    signed = ss.tl.gene_program_enrichment(data, **args).set_index("program").loc[plain.index]
    assert plain.index[0] == name and plain.loc[name, "bf"] > np.log(10)
    np.testing.assert_allclose(signed["bf"], plain["bf"] * signed["direction"], atol=1e-4)
    with torch.no_grad():  # weights that cancel: +1 and -1 in turn over the program's genes
        genes = torch.nonzero(model.module.decoder.mask[:, k]).ravel()
        model.module.decoder.programs[genes, k] = torch.tensor([1.0, -1.0]).repeat(len(genes))[: len(genes)]
    assert model.programs().loc[name, "direction_confidence"] < 0.1
    with pytest.warns(UserWarning, match=rf"direction of 1 strongly changed program.*{name}"):
        ss.tl.gene_program_enrichment(data, **args)


def test_save_load_keeps_the_mask(fitted, tmp_path):
    data, model = fitted
    model.save(tmp_path / "m")
    loaded = ss.EXPIMAP.load(tmp_path / "m", adata=data)
    assert torch.equal(loaded.module.decoder.mask, model.module.decoder.mask)
    assert loaded.setup.program_names == list(data.uns["terms"])
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())


def test_bad_input_raises_and_leaves_adata_unchanged():
    data = make_adata(n_obs=60)
    snap = snapshot(data)
    with pytest.raises(KeyError, match="add_gene_programs"):
        ss.pp.expimap(data, condition_key="batch", use_highly_variable_genes=False)
    assert_unchanged(data, snap)
    ss.tl.add_gene_programs(data, _programs(data), min_genes=12)
    data.uns["terms"] = data.uns["terms"][:2]
    snap = snapshot(data)
    with pytest.raises(ValueError, match="must name the 4 programs"):
        ss.pp.expimap(data, condition_key="batch", use_highly_variable_genes=False)
    assert_unchanged(data, snap)


def _reference_and_query(n_obs=300, n_batches=3, epochs=5):
    """Toy data with four programs, an expiMap reference trained on all batches but the last, and
    that last batch as the query."""
    data = make_adata(n_obs=n_obs, n_batches=n_batches)
    ss.tl.add_gene_programs(data, _programs(data), min_genes=12)
    is_query = (data.obs["batch"] == f"batch_{n_batches - 1}").to_numpy()
    ref, query = data[~is_query].copy(), data[is_query].copy()
    ref.obs["batch"] = ref.obs["batch"].cat.remove_unused_categories()
    model = ss.EXPIMAP(ref, batch_key="batch", **SMALL)
    model.train(max_epochs=epochs, progress_bar=False)
    return data, ref, query, model


def test_map_query_keeps_the_reference_bit_identical():
    _data, _ref, query, model = _reference_and_query()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    qm = ss.tl.map_query(query, model, max_epochs=5, progress_bar=False)
    after = qm.module.state_dict()
    grown = grown_columns_only(before, after)
    assert grown == ["decoder.condition.weight", "encoder.condition.weight", "log_theta"]
    assert query.obsm["X_expimap"].shape == (query.n_obs, 4)


needs_real_data = pytest.mark.skipif(
    not (SHARED / "kang2018_ifnb_pbmc_2k.h5ad").is_file(), reason="real data not in ../shared"
)


def _kang_onto_pbmc(leave_out=()):
    """A PBMC reference without the Kang study, with the hallmark programs (but ``leave_out``),
    and the Kang study (CTRL and STIM) as one query study."""
    reference = ad.read_h5ad(SHARED / "pbmc_multistudy_5batch_14989cells_2003genes.h5ad")
    reference = reference[~reference.obs["batch"].astype(str).str.startswith("kang")].copy()
    query = ad.read_h5ad(SHARED / "kang2018_ifnb_pbmc_2k.h5ad")
    genes = reference.var_names.intersection(query.var_names)
    reference, query = reference[:, genes].copy(), query[:, genes].copy()
    reference.obs["study"] = reference.obs["batch"].astype(str)
    query.obs["study"] = "kang2018"
    query.obs["condition"] = query.obs["batch"].astype(str)
    hallmark = {k: v for k, v in ss.tl.read_gmt(SHARED / "msigdb_h.all.v7.0.symbols.gmt").items() if k not in leave_out}
    ss.tl.add_gene_programs(reference, hallmark, min_genes=12, clean=True)
    model = ss.pp.expimap(reference, condition_key="study", use_highly_variable_genes=False, max_epochs=30,
                          return_model=True, progress_bar=False)  # fmt: skip
    return model, query


@needs_real_data
def test_interferon_programs_top_the_stimulated_cells():
    """The published demonstration on our data: a PBMC reference without the Kang study, hallmark
    programs; the Kang study mapped as one query study; in STIM vs CTRL enrichment an interferon
    program ranks first, far ahead of every other program."""
    model, query = _kang_onto_pbmc()
    ss.tl.map_query(query, model, batch_key="study", max_epochs=20, progress_bar=False)
    result = ss.tl.gene_program_enrichment(query, groupby="condition", comparison="CTRL")  # the query model in uns
    stim = result[result["group"] == "STIM"]
    assert stim["program"].iloc[0] == "INTERFERON_ALPHA_RESPONSE", list(stim["program"][:5])
    assert stim["bf"].iloc[0] > 2.0 and stim["bf"].iloc[0] - stim["bf"].iloc[1] > 1.5
    ranked = query.uns["expimap_enrichment"]
    assert ranked["names"]["STIM"][0] == "INTERFERON_ALPHA_RESPONSE"  # rank_genes_groups layout


@needs_real_data
def test_a_program_new_to_the_reference_is_learned_from_the_query():
    """The reference lacks the interferon programs; the query brings the hallmark interferon alpha
    response as a new program, which alone learns from the query: it tops STIM vs CTRL."""
    ifn = ("HALLMARK_INTERFERON_ALPHA_RESPONSE", "HALLMARK_INTERFERON_GAMMA_RESPONSE")
    model, query = _kang_onto_pbmc(leave_out=ifn)
    assert not any("INTERFERON" in name for name in model.setup.program_names)
    new = {"NEW_IFN_ALPHA": ss.tl.read_gmt(SHARED / "msigdb_h.all.v7.0.symbols.gmt")[ifn[0]]}
    ss.tl.map_query(query, model, batch_key="study", new_programs=new, max_epochs=20, progress_bar=False)
    result = ss.tl.gene_program_enrichment(query, groupby="condition", comparison="CTRL")
    stim = result[result["group"] == "STIM"]
    assert stim["program"].iloc[0] == "NEW_IFN_ALPHA", list(stim["program"][:5])
    assert stim["bf"].iloc[0] > 2.0 and stim["bf"].iloc[0] - stim["bf"].iloc[1] > 1.0


def test_hsic_is_larger_for_dependent_sets():
    from scanpy_scvi.nn import hsic

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(300, 3, generator=gen)
    assert float(hsic(z, z[:, :2])) > 5 * float(hsic(z, torch.randn(300, 2, generator=gen)))


def test_a_query_can_add_extension_programs():
    data, ref, query, model = _reference_and_query()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    qm = ss.tl.map_query(query, model, n_ext=2, max_epochs=5, progress_bar=False)
    assert query.obsm["X_expimap"].shape == (query.n_obs, 6)
    assert list(qm.programs().index[-2:]) == ["extension_0", "extension_1"]
    after = qm.module.state_dict()
    assert torch.equal(after["decoder.programs"], before["decoder.programs"])
    assert torch.equal(after["mean.weight"], before["mean.weight"])
    assert after["decoder.extension"].shape == (data.n_vars, 2) and qm.module.decoder.extension.requires_grad
    trvae = ss.TRVAE(ref, batch_key="batch", n_latent=2)
    trvae.train(1, progress_bar=False)
    with pytest.raises(ValueError, match="n_ext"):
        ss.tl.map_query(query.copy(), trvae, n_ext=1, max_epochs=0)


def test_a_query_can_add_constrained_programs(tmp_path):
    """scArches' new_n_ext_m with new_ext_mask: new programs with their own gene sets, learned from
    the query after the reference's programs, out-of-set weights exactly zero."""
    data, _ref, query, model = _reference_and_query()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    genes = list(data.var_names)
    new = {"NEW_A": [g.lower() for g in genes[:15]] + ["NOT_A_GENE"], "NEW_B": genes[20:40]}
    qm = ss.tl.map_query(query, model, new_programs=new, n_ext=1, max_epochs=5, trainer_kwargs={"gamma_ext": 0.1},
                         progress_bar=False)  # fmt: skip
    assert query.obsm["X_expimap"].shape == (query.n_obs, 4 + 2 + 1)
    assert qm.train_config["gamma_ext"] == 0.1
    params = query.uns["expimap"]["params"]
    assert list(params["new_programs"]) == ["NEW_A", "NEW_B"] and params["n_ext"] == 1 and params["gamma_ext"] == 0.1
    table = qm.programs()
    assert list(table.index[4:]) == ["NEW_A", "NEW_B", "extension_0"]
    assert table.loc["NEW_A", "n_genes"] == 15 and table.loc["NEW_B", "n_genes"] == 20
    after = qm.module.state_dict()
    assert grown_columns_only(before, after) == ["decoder.condition.weight", "encoder.condition.weight", "log_theta"]
    assert {k for k in after if k not in before} == {
        "decoder.masked_extension", "decoder.ext_mask", "decoder.extension", "ext_mean.weight", "ext_mean.bias",
        "ext_log_var.weight", "ext_log_var.bias",
    }  # fmt: skip
    w = qm.module.decoder.all_weights().detach()
    assert torch.all(w[40:, 4:6] == 0) and torch.all(w[15:20, 4] == 0) and torch.all(w[:20, 5] == 0)
    assert torch.all(w[:15, 4] != 0) and qm.module.decoder.masked_extension.requires_grad
    assert set(qm.term_genes("NEW_A")["genes"]) == set(genes[:15])
    qm.save(tmp_path / "q")
    loaded = ss.EXPIMAP.load(tmp_path / "q", adata=query)
    assert loaded.programs().equals(table)
    np.testing.assert_array_equal(loaded.get_latent_representation(), query.obsm["X_expimap"])


def test_bad_new_programs_raise_and_leave_the_query_unchanged():
    data, ref, query, model = _reference_and_query(n_obs=200, n_batches=2, epochs=1)
    snap = snapshot(query)
    for programs, match in (
        ({"NEW": ["NOPE1", "NOPE2"]}, "no gene among"),
        ({"HALLMARK_P0": list(data.var_names[:5])}, "already programs"),
    ):
        with pytest.raises(ValueError, match=match):
            ss.tl.map_query(query, model, new_programs=programs, max_epochs=0)
        assert_unchanged(query, snap)
    with pytest.raises(ValueError, match="new_programs_soft_mask"):
        ss.tl.map_query(query, model, new_programs_soft_mask=True, max_epochs=0)
    trvae = ss.TRVAE(ref, batch_key="batch", n_latent=2)
    trvae.train(1, progress_bar=False)
    with pytest.raises(ValueError, match="new_programs: not an option of trVAE references"):
        ss.tl.map_query(query, trvae, new_programs={"NEW": list(data.var_names[:5])}, max_epochs=0)
    assert_unchanged(query, snap)


def test_map_query_finds_an_expimap_reference_in_an_anndata():
    data = make_adata(n_obs=160, n_batches=2)
    ss.tl.add_gene_programs(data, _programs(data), min_genes=12)
    ref, query = data[data.obs["batch"] == "batch_0"].copy(), data[data.obs["batch"] == "batch_1"].copy()
    ss.pp.expimap(ref, condition_key="batch", use_highly_variable_genes=False, max_epochs=2, progress_bar=False,
                  **SMALL)  # fmt: skip
    qm = ss.tl.map_query(query, ref, progress_bar=False)  # the model in ref.uns['expimap'], default epochs
    assert qm.train_config["max_epochs"] == 40 and query.obsm["X_expimap"].shape == (query.n_obs, 4)


def test_soft_masked_new_programs_get_the_l1_step_out_of_their_mask():
    m = ProgramVAE(3, n_latent=1, n_ext_masked=1, soft_ext_mask=True, **SMALL)
    w = torch.tensor([[2.0], [0.5], [-0.1]])
    with torch.no_grad():
        m.decoder.masked_extension.copy_(w)
    m.decoder.ext_mask.copy_(torch.tensor([[1.0], [0.0], [0.0]]))
    m.proximal_step(group_threshold=0.0, l1_threshold=0.2)
    assert torch.allclose(m.decoder.masked_extension, torch.tensor([[2.0], [0.3], [0.0]]))


def test_differential_expression_works_on_programs_model(fitted):
    data, model = fitted
    de = ss.tl.differential_expression(data, groupby="labels", model=model, n_samples=100, inplace=False)
    assert len(de) == 3 * data.n_vars and np.all(np.isfinite(de["lfc_mean"]))
