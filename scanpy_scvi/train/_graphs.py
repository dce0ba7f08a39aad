"""The training step captured once as a CUDA graph, then replayed for every full minibatch.

On a GPU the step of a model of this size (forward, backward and Adam: a few hundred small
kernels) is bound by the host launching the kernels, not by the device running them. Captured
once, the whole step is a single launch; each minibatch is first copied into the graph's
static inputs. The recipe is PyTorch's whole-network capture: a few eager warm-up steps on a
side stream, gradients set to None before the capture, an optimiser with ``capturable=True``
(and, for a learning-rate schedule, the rate as a device tensor that the schedule fills).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from .._compat import logg

if TYPE_CHECKING:
    from torch import nn

    from ._objective import Objective, Terms

#: Eager steps before the capture (lazy initialisation: optimiser state, library workspaces).
WARMUP_STEPS = 3


class GraphedStep:
    """Replays one captured training step on minibatches of exactly ``batch_size`` cells.

    :meth:`step` returns the step's :class:`Terms` (the graph's static outputs, valid until
    the next step), or None when this minibatch must take the eager path: another size, or a
    capture that failed (logged once; training then goes on eagerly).
    """

    def __init__(self, module: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer, batch_size: int):
        self.module, self.objective, self.optimizer = module, objective, optimizer
        self.batch_size = batch_size
        self.failed = False
        self._warmed = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: dict[str, torch.Tensor] = {}
        self._kl_weight: torch.Tensor | None = None
        self._terms: Terms | None = None
        self._side = torch.cuda.Stream()

    def takes(self, n_cells: int) -> bool:
        """Whether a minibatch of ``n_cells`` goes through :meth:`step`."""
        return not self.failed and n_cells == self.batch_size

    def step(self, batch: dict[str, torch.Tensor], kl_weight: float) -> Terms | None:
        if self._graph is None:
            if self._warmed < WARMUP_STEPS:
                self._warmed += 1
                return self._warm_up(batch, kl_weight)
            if not self._capture(batch):
                return None
        for key, value in batch.items():
            self._static[key].copy_(value, non_blocking=True)
        self._kl_weight.fill_(kl_weight)
        self._graph.replay()
        return self._terms

    def _eager(self, batch: dict[str, torch.Tensor], kl_weight) -> Terms:
        terms = self.objective.loss(self.module, batch, kl_weight)
        self.optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        self.optimizer.step()
        return terms

    def _warm_up(self, batch: dict[str, torch.Tensor], kl_weight: float) -> Terms:
        main = torch.cuda.current_stream()
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            terms = self._eager(batch, kl_weight)
        main.wait_stream(self._side)
        return terms

    def _capture(self, batch: dict[str, torch.Tensor]) -> bool:
        self._static = {key: value.clone() for key, value in batch.items()}
        self._kl_weight = torch.zeros((), device=batch["X"].device)
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward then owns the gradients
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                terms = self._eager_in_graph()
            # the static outputs, without the captured autograd graph: kept alive, its nodes
            # would serve the eager steps too, from the capture's stream
            self._terms = dataclasses.replace(
                terms, loss=terms.loss.detach(), reconstruction=terms.reconstruction.detach(), kl=terms.kl.detach()
            )
            del terms
        except RuntimeError as err:
            self.failed = True
            self._static, self._terms = {}, None
            self.optimizer.zero_grad(set_to_none=True)
            logg.warning(f"    could not capture the training step as a CUDA graph ({err}); training goes on eagerly")
            return False
        self._graph = graph
        logg.info("    training steps replayed as a CUDA graph")
        return True

    def _eager_in_graph(self) -> Terms:
        terms = self.objective.loss(self.module, self._static, self._kl_weight)
        terms.loss.backward()
        self.optimizer.step()
        return terms
