"""scvi 0.6 argument names of ``model_kwargs`` (``VAE`` / ``LDVAE``) and ``trainer_kwargs``
(``UnsupervisedTrainer`` / ``Trainer``), translated into our settings for ``pp.scvi``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# -- model_kwargs: the 0.6 VAE / LDVAE signature ------------------------------------------------------
_SAME_NAME = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion", "latent_distribution")
_SET_BY_THE_DATA = {
    "n_input": "the number of genes (see use_highly_variable_genes / subset_genes)",
    "n_batch": "the categories of batch_key",
    "n_labels": "the categories of labels_key",
}


def architecture_from_vae_kwargs(kwargs: Mapping[str, Any], *, linear_decoder: bool) -> dict[str, Any]:
    """Our architecture settings for the scvi 0.6 ``VAE`` (or, with ``linear_decoder``, ``LDVAE``)
    keyword arguments ``kwargs``; our own setting names pass through unchanged.

    ``reconstruction_loss`` is ``gene_likelihood``; ``n_layers_encoder`` (LDVAE) is ``n_layers``;
    ``log_variational=True`` is what our encoder always does (log(1 + x)); LDVAE's boolean
    ``use_batch_norm`` normalises the linear decoder (and, always in 0.6, the encoder) and
    ``bias=False`` is our linear decoder. Names without a meaning here raise a ``TypeError``.
    """
    from ...nn import VAEArchitecture

    ours = set(VAEArchitecture.names())
    out: dict[str, Any] = {}

    def put(name: str, value: Any, given_as: str) -> None:
        _set_once(out, name, value, f"model_kwargs ({given_as})")

    for key, value in kwargs.items():
        if key in _SET_BY_THE_DATA:
            msg = f"model_kwargs[{key!r}] is set by the data here: {_SET_BY_THE_DATA[key]}. Remove it."
            raise TypeError(msg)
        if key == "reconstruction_loss":
            put("gene_likelihood", value, key)
        elif key == "n_layers_encoder":
            put("n_layers", value, key)
        elif key == "log_variational":
            if value is not True:
                msg = (
                    "model_kwargs['log_variational']=False has no meaning here: the encoder always takes "
                    "log(1 + counts), the 0.x default."
                )
                raise ValueError(msg)
        elif key == "bias":
            if value:
                msg = "model_kwargs['bias']=True: the linear decoder here has no bias (LDVAE's default, bias=False)."
                raise ValueError(msg)
        elif key == "use_batch_norm" and isinstance(value, bool):
            # 0.6 LDVAE: the flag normalises its linear decoder; the encoder is always batch-normalised
            put(
                "use_batch_norm",
                ("both" if value else "encoder") if linear_decoder else ("both" if value else "none"),
                key,
            )
        elif key in _SAME_NAME or key in ours:
            put(key, value, key)
        else:
            msg = (
                f"model_kwargs got unknown key {key!r}. It takes the scvi 0.6 VAE/LDVAE arguments "
                f"(reconstruction_loss, n_layers_encoder, log_variational, use_batch_norm, bias, {', '.join(_SAME_NAME)}) "
                f"and our architecture settings {sorted(ours)}."
            )
            raise TypeError(msg)
    return out


# -- trainer_kwargs: the 0.6 UnsupervisedTrainer / Trainer signature ------------------------------------
# our own training settings that trainer_kwargs also takes
OUR_TRAIN_SETTINGS = (
    "weight_decay",
    "eps",
    "n_epochs_kl_warmup",
    "n_steps_kl_warmup",
    "min_kl_weight",
    "max_kl_weight",
    "early_stopping_patience",
    "early_stopping_min_delta",
    "reduce_lr_on_plateau",
    "lr_factor",
    "lr_patience",
)
# trainer_kwargs names that are arguments of pp.scvi itself (the historical wrapper passed them too)
_CALL_ARGUMENTS = {
    "train_size": "train_size",
    "use_cuda": "use_cuda",
    "batch_size": "batch_size",
    "seed": "random_state",
}
_NO_MEANING = {
    "metrics_to_monitor": None,  # checked below: the history always holds the ELBO and its terms
    "max_nans": "training stops with an error at the first non-finite loss",
    "lr_D": "there is no discriminator in scVI",
    "beta1_D": "there is no discriminator in scVI",
    "beta2_D": "there is no discriminator in scVI",
}


def train_from_trainer_kwargs(kwargs: Mapping[str, Any], call: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    """Our training settings for the scvi 0.6 ``UnsupervisedTrainer`` keyword arguments ``kwargs``.

    ``call`` holds the values of the ``pp.scvi`` arguments that 0.x trainers also took
    (``train_size``, ``use_cuda``, ``batch_size``, ``random_state``) and whether each was given
    explicitly (``call['explicit']``, a set of names). Returns ``(train_settings, call_updates)``:
    settings for ``model.train`` and new values for those call arguments.
    """
    train: dict[str, Any] = {}
    updates: dict[str, Any] = {}
    monitored = None  # early_stopping_kwargs['on']

    def update(name: str, value: Any, given_as: str) -> None:
        if name in call.get("explicit", ()) and call[name] != value:
            msg = f"trainer_kwargs[{given_as!r}]={value!r} contradicts {name}={call[name]!r}; pass one of them."
            raise ValueError(msg)
        _set_once(updates, name, value, "trainer_kwargs")

    for key, value in kwargs.items():
        if key in OUR_TRAIN_SETTINGS:
            train[key] = value
        elif key in _CALL_ARGUMENTS:
            update(_CALL_ARGUMENTS[key], value, key)
        elif key == "n_iter_kl_warmup":
            if value is not None:
                train["n_steps_kl_warmup"] = value
        elif key == "test_size":
            if value is not None:
                update("train_size", 1 - _fraction(value, call["n_obs"], "test_size"), key)
        elif key == "frequency":
            pass  # the history is recorded every epoch: a superset of any frequency
        elif key == "show_progbar":
            updates["progress_bar"] = bool(value)
        elif key == "normalize_loss":
            if value is False:
                msg = (
                    "trainer_kwargs['normalize_loss']=False: the loss here is always the mean over cells (0.x's True)."
                )
                raise ValueError(msg)
        elif key == "benchmark":
            if value:
                msg = "trainer_kwargs['benchmark']=True (evaluate without training) has no meaning here; use n_epochs."
                raise ValueError(msg)
        elif key == "metrics_to_monitor":
            unknown = sorted(set(value or ()) - {"elbo", "reconstruction_error"})
            if unknown:
                msg = (
                    f"trainer_kwargs['metrics_to_monitor'] has {unknown}: the history here records the ELBO and its "
                    "terms every epoch; compute other scores after training (Posterior.entropy_batch_mixing, ...)."
                )
                raise ValueError(msg)
        elif key == "early_stopping_kwargs":
            settings, monitored = _early_stopping(value or {})
            train.update(settings)
        elif key == "data_loader_kwargs":
            size = loader_batch_size(value or {}, "trainer_kwargs['data_loader_kwargs']")
            if size is not None:
                update("batch_size", size, "data_loader_kwargs']['batch_size")
        elif key in _NO_MEANING:
            msg = f"trainer_kwargs[{key!r}] has no meaning here: {_NO_MEANING[key]}."
            raise TypeError(msg)
        else:
            msg = (
                f"trainer_kwargs got unknown key {key!r}. It takes the scvi 0.6 UnsupervisedTrainer arguments "
                "(train_size, test_size, n_iter_kl_warmup, n_epochs_kl_warmup, normalize_loss, frequency, "
                "early_stopping_kwargs, data_loader_kwargs, metrics_to_monitor, benchmark, show_progbar, "
                f"weight_decay, batch_size, seed, use_cuda) and our training settings {list(OUR_TRAIN_SETTINGS)}."
            )
            raise TypeError(msg)
    if monitored is not None and (train.get("early_stopping") or train.get("reduce_lr_on_plateau")):
        _check_monitor(monitored, updates.get("train_size", call["train_size"]))
    return train, updates


def loader_batch_size(data_loader_kwargs: Mapping[str, Any], where: str) -> int | None:
    """The ``batch_size`` of 0.x ``data_loader_kwargs`` (None if absent). ``shuffle``,
    ``pin_memory`` and ``num_workers`` are accepted and change nothing: training always shuffles,
    outputs come in cell order, minibatches are built in-process; other keys are errors."""
    for key in data_loader_kwargs:
        if key not in ("batch_size", "shuffle", "pin_memory", "num_workers"):
            msg = f"{where} key {key!r} has no meaning here (only batch_size)."
            raise TypeError(msg)
    size = data_loader_kwargs.get("batch_size")
    return None if size is None else int(size)


def _set_once(store: dict[str, Any], name: str, value: Any, source: str) -> None:
    if name in store and store[name] != value:
        msg = f"{source} sets {name} twice with different values ({store[name]!r} and {value!r})."
        raise ValueError(msg)
    store[name] = value


def _fraction(value, n_obs: int, name: str) -> float:
    """A 0.x size: a fraction in (0, 1) or a number of cells."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        return int(value) / n_obs
    value = float(value)
    if not 0 <= value < 1:
        msg = f"trainer_kwargs[{name!r}] must be a fraction in [0, 1) or a number of cells, got {value}."
        raise ValueError(msg)
    return value


def _early_stopping(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Our settings for a 0.x ``early_stopping_kwargs`` dict, and the set it monitors (``on``)."""
    out: dict[str, Any] = {}
    on = None
    for key, value in kwargs.items():
        if key == "early_stopping_metric":
            if value not in (None, "elbo"):
                msg = f"early_stopping_kwargs['early_stopping_metric']={value!r}: only 'elbo' is monitored here."
                raise ValueError(msg)
            out["early_stopping"] = value is not None
        elif key == "save_best_state_metric":
            if value not in ("elbo", None) or (value is None and kwargs.get("early_stopping_metric") is not None):
                msg = (
                    f"early_stopping_kwargs['save_best_state_metric']={value!r}: early stopping here always restores "
                    "the weights of the best ELBO epoch (save_best_state_metric='elbo')."
                )
                raise ValueError(msg)
        elif key == "on":
            if value not in ("test_set", "train_set"):
                msg = f"early_stopping_kwargs['on'] must be 'test_set' or 'train_set', got {value!r}."
                raise ValueError(msg)
            on = value
        elif key == "patience":
            out["early_stopping_patience"] = value
        elif key == "threshold":
            out["early_stopping_min_delta"] = value
        elif key in ("reduce_lr_on_plateau", "lr_patience", "lr_factor"):
            out[key] = value
        elif key == "benchmark":
            if value:
                msg = "early_stopping_kwargs['benchmark']=True has no meaning here."
                raise ValueError(msg)
        else:
            msg = (
                f"early_stopping_kwargs got unknown key {key!r} (known: early_stopping_metric, save_best_state_metric, "
                "on, patience, threshold, reduce_lr_on_plateau, lr_patience, lr_factor)."
            )
            raise TypeError(msg)
    return out, on


def _check_monitor(on: str, train_size: float) -> None:
    """0.x monitored the ``on`` set; here early stopping monitors the held-out cells when there are
    any and the training cells otherwise: the two must agree."""
    held_out = train_size < 1
    if (on == "test_set") != held_out:
        msg = (
            f"early_stopping_kwargs['on']={on!r} with train_size={train_size}: here the ELBO of the held-out cells is "
            "monitored when there are any, else that of the training cells. Use on='test_set' with train_size < 1, "
            "or on='train_set' with train_size=1."
        )
        raise ValueError(msg)
