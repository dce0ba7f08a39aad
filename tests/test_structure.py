"""The package's structure rules: no reach-ins, one argument vocabulary, short modules, one
architecture declaration, a training loop that takes plug-in objectives."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import scanpy_scvi as ss
from scanpy_scvi.nn import (
    VAE,
    EXPIMAPArchitecture,
    SCANVIArchitecture,
    SCPOLIArchitecture,
    TRVAEArchitecture,
    VAEArchitecture,
)
from scanpy_scvi.train import Objective, TrainConfig, train

PACKAGE = Path(ss.__file__).parent
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _subpackage(path: Path) -> str | None:
    """The subpackage a module belongs to (None for the package's root modules)."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def _private_names_by_subpackage() -> dict[str, set[str]]:
    """Private names (``_x``, not dunders) each subpackage defines: functions, classes,
    module-level and ``self.`` attributes."""
    names: dict[str, set[str]] = {}
    for path in MODULES:
        sub = _subpackage(path)
        if sub is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            found = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found.append(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                found.append(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                found.append(node.attr)
            names.setdefault(sub, set()).update(n for n in found if _is_private(n))
    return names


def test_no_module_reaches_into_another_subpackages_private_names():
    private = _private_names_by_subpackage()
    problems = []
    for path in MODULES:
        sub = _subpackage(path)
        own = private.get(sub, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level >= 2 or module.startswith("scanpy_scvi."):  # another subpackage (or the root)
                    parts = [p for p in module.removeprefix("scanpy_scvi.").split(".") if p]
                    target_sub = parts[0] if parts else None
                    if node.level == 1 or (node.level == 2 and sub is None):
                        continue
                    if parts and parts[0].startswith("_"):
                        continue  # the root's shared modules (_settings, _compat)
                    if target_sub != sub and any(p.startswith("_") for p in parts[1:]):
                        problems.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports from {module}")
                    bad = [a.name for a in node.names if _is_private(a.name) and target_sub != sub]
                    if bad:
                        problems.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {bad} from {module}")
            elif isinstance(node, ast.Attribute) and _is_private(node.attr):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                foreign = {s for s, names in private.items() if s != sub and node.attr in names}
                if foreign and node.attr not in own:
                    problems.append(f"{path.relative_to(PACKAGE)}:{node.lineno} touches .{node.attr} of {foreign}")
    assert not problems, "\n".join(problems)


def test_modules_are_short_or_say_why():
    long = [
        f"{p.relative_to(PACKAGE)} ({n} lines)"
        for p in MODULES
        if (n := len(p.read_text().splitlines())) > 600
        and "lines" not in (ast.get_docstring(ast.parse(p.read_text())) or "")
    ]
    assert not long, long


# -- one argument vocabulary for every pp model function ------------------------------------------
VOCABULARY = {
    "n_epochs", "max_epochs", "use_cuda", "device", "return_posterior", "return_model", "copy", "random_state",
    "key_added", "layer", "batch_key", "progress_bar", "store_model", "use_highly_variable_genes", "subset_genes",
    "lr", "batch_size", "train_size", "early_stopping", "categorical_covariate_keys", "continuous_covariate_keys",
    "check_counts",
}  # fmt: skip


def _pp_functions():
    return [getattr(ss.pp, name) for name in ss.pp.__all__ if inspect.isfunction(getattr(ss.pp, name))]


@pytest.mark.parametrize("func", _pp_functions(), ids=lambda f: f.__name__)
def test_pp_functions_share_the_vocabulary(func):
    params = inspect.signature(func).parameters
    first, *rest = params.values()
    assert first.name == "adata"
    assert all(p.kind is p.KEYWORD_ONLY for p in rest), "only adata is positional"
    assert set(params) >= VOCABULARY, sorted(VOCABULARY - set(params))
    assert params["key_added"].default.startswith("X_")
    for p in rest:  # every argument is documented
        assert (
            f"\n    {p.name}\n" in func.__doc__ or f" {p.name}," in func.__doc__ or f", {p.name}\n" in func.__doc__
        ), p.name


def test_pp_functions_give_shared_arguments_the_same_defaults():
    """The run and data arguments mean and default the same everywhere (architectures and the
    training settings keep each model's published defaults)."""
    from scanpy_scvi.data import SetupArguments
    from scanpy_scvi.pp._run import RunArguments

    funcs = _pp_functions()
    shared = set(RunArguments.names()) | set(SetupArguments.names())
    for name in shared:
        defaults = {f.__name__: inspect.signature(f).parameters[name].default for f in funcs}
        assert len({repr(d) for d in defaults.values()}) == 1, (name, defaults)


def _prepared(name: str, adata):
    """``adata`` with what ``pp.<name>`` needs besides counts, and that function's own arguments."""
    if name == "totalvi":
        rng = np.random.default_rng(0)
        adata.obsm["protein_expression"] = pd.DataFrame(
            rng.poisson(20, (adata.n_obs, 4)), index=adata.obs_names, columns=[f"P{i}" for i in range(4)]
        )
    if name == "expimap":
        genes = list(adata.var_names)
        ss.tl.add_gene_programs(adata, {"A": genes[:15], "B": genes[15:30]}, min_genes=12)
    return {"scanvi": {"labels_key": "labels", "unlabeled_category": "Unknown"}}.get(name, {})


@pytest.mark.parametrize("func", _pp_functions(), ids=lambda f: f.__name__)
def test_pp_functions_record_the_run_alike(func, adata):
    """Every ``pp`` function writes the run's entries of ``uns[key]['params']`` the same way."""
    own = _prepared(func.__name__, adata)
    func(adata, max_epochs=1, use_highly_variable_genes=False, random_state=3, key_added="X_mine",
         progress_bar=False, **own)  # fmt: skip
    params = adata.uns["mine"]["params"]
    expected = {"max_epochs": 1, "use_highly_variable_genes": False, "genes_from": "all", "random_state": 3,
                "key_added": "X_mine"}  # fmt: skip
    assert {k: params.get(k) for k in expected} == expected
    assert adata.obsm["X_mine"].shape[0] == adata.n_obs


def test_pp_scanvi_takes_the_historical_names(adata):
    """The call that used to fail first: scanvi with pp.scvi's historical argument names."""
    model = ss.pp.scanvi(
        adata, labels_key="labels", unlabeled_category="Unknown", use_highly_variable_genes=False, n_epochs=1,
        use_cuda=False, return_posterior=True, n_hidden=8, n_latent=2, progress_bar=False,
    )  # fmt: skip
    assert isinstance(model, ss.SCANVI)
    assert model.train_config["max_epochs"] == 1 and model.device.type == "cpu"
    with pytest.raises(ValueError, match="disagree"):
        ss.pp.scanvi(adata, labels_key="labels", unlabeled_category="Unknown", n_epochs=1, max_epochs=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_epoch'"):
        ss.pp.scvi(adata, n_epoch=1)


# -- one architecture declaration ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "architecture"),
    [(ss.SCVI, VAEArchitecture), (ss.pp.scvi, VAEArchitecture), (ss.SCANVI, SCANVIArchitecture),
     (ss.pp.scanvi, SCANVIArchitecture), (ss.TRVAE, TRVAEArchitecture), (ss.pp.trvae, TRVAEArchitecture),
     (ss.SCPOLI, SCPOLIArchitecture), (ss.pp.scpoli, SCPOLIArchitecture), (ss.EXPIMAP, EXPIMAPArchitecture),
     (ss.pp.expimap, EXPIMAPArchitecture)],
)  # fmt: skip
def test_every_architecture_setting_is_an_argument_with_its_default(target, architecture):
    params = inspect.signature(target).parameters
    for f in dataclasses.fields(architecture):
        assert params[f.name].default == f.default, f.name
        assert f.metadata["doc"].split()[0] in target.__doc__, f"{f.name} undocumented"


def test_saved_architecture_is_the_declared_one(trained_model):
    stored = trained_model.architecture.to_dict()
    assert list(stored) == VAEArchitecture.names()
    assert VAEArchitecture.from_dict(stored) == trained_model.architecture
    assert trained_model.module.architecture == trained_model.architecture
    with pytest.raises(ValueError, match="newer"):
        VAEArchitecture.from_dict({**stored, "future_setting": 1})
    with pytest.raises(ValueError, match="dispersion='gene-x' is not one of"):
        VAEArchitecture(dispersion="gene-x")
    assert VAEArchitecture(linear_decoder=True).gene_likelihood == "nb"  # the published LDVAE default


# -- the training loop and plug-in objectives ------------------------------------------------------
class _Source:
    """A minimal minibatch source: dense counts with one batch."""

    def __init__(self, X):
        self.X = torch.as_tensor(X, dtype=torch.float32)

    def get(self, idx, device="cpu", sparse=False, nonzero=False):
        idx = torch.as_tensor(np.asarray(idx))
        return {"X": self.X[idx], "batch": torch.zeros(len(idx), dtype=torch.int64)}


class _Counting(Objective):
    """The ELBO plus hooks that count their calls and a proximal step that keeps one weight at 0."""

    def __init__(self):
        self.calls = {"begin": 0, "epoch_start": 0, "after_step": 0}

    def begin(self, context):
        self.calls["begin"] += 1
        self.n_train = len(context.train_idx)
        self.lr = context.optimizer.param_groups[0]["lr"]

    def epoch_start(self, module, epoch):
        self.calls["epoch_start"] += 1
        assert module.training

    def loss(self, module, batch, kl_weight):
        terms = super().loss(module, batch, kl_weight)
        terms.extra = {"cells": (float(len(batch["X"])), 1)}
        return terms

    def after_step(self, module):
        self.calls["after_step"] += 1
        with torch.no_grad():
            module.scale_head.weight[:, 0] = 0.0


def _counts(n=64, g=12, seed=0):
    return np.random.default_rng(seed).poisson(3.0, size=(n, g)).astype(np.float32) + np.eye(n, g)


def test_objective_hooks_run_where_the_loop_says():
    X = _counts()
    module = VAE(X.shape[1], n_hidden=8, n_latent=2)
    objective = _Counting()
    config = TrainConfig(max_epochs=3, batch_size=16)
    history, _ = train(module, _Source(X), np.arange(48), np.arange(48, 64), config, objective,
                       device=torch.device("cpu"), seed=0, progress_bar=False)  # fmt: skip
    assert objective.calls == {"begin": 1, "epoch_start": 3, "after_step": 9}
    assert objective.n_train == 48 and objective.lr == config.lr
    assert torch.all(module.scale_head.weight[:, 0] == 0)
    assert history["cells_train"] == [16.0] * 3  # an extra metric: sum over batches / count
    assert set(history) >= {"elbo_train", "elbo_validation", "kl_weight", "train_loss"}


def test_kl_warmup_by_steps_and_plateau_schedule():
    config = TrainConfig(n_steps_kl_warmup=10, n_epochs_kl_warmup=400)
    assert [config.kl_weight(0, s) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert TrainConfig(n_epochs_kl_warmup=4).kl_weight(2, 999) == 0.5
    X = _counts()
    module = VAE(X.shape[1], n_hidden=8, n_latent=2)
    config = TrainConfig(max_epochs=6, batch_size=64, lr=1e-2, reduce_lr_on_plateau=True, lr_patience=0,
                         lr_threshold=1e9, lr_factor=0.5)  # fmt: skip
    history, _ = train(module, _Source(X), np.arange(64), np.arange(0), config,
                       device=torch.device("cpu"), seed=0, progress_bar=False)  # fmt: skip
    # an impossible improvement threshold: the rate halves after every epoch but the first;
    # the history records the rate each epoch trained with
    assert history["lr"] == pytest.approx([1e-2] + [1e-2 * 0.5**k for k in range(5)])


def test_compat_warn_points_at_the_callers_line():
    from scanpy_scvi._compat import warn

    with pytest.warns(UserWarning, match="hello") as record:
        warn("hello")
    assert record[0].filename == __file__
