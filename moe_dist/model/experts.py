"""The experts of one MoE layer: stacked parameters, computed by grouped GEMMs (or a loop).

:class:`GroupedExperts` holds the layer's local experts stacked, one parameter per matrix:
``w_gate``/``w_up`` ``(El, F, D)``, ``w_down`` ``(El, D, F)``, row ``j`` being global expert
``first + j``. They run as grouped GEMMs (``torch._grouped_mm``) over rows sorted expert-major, with
group offsets from a device-side cumsum, or by a per-expert loop where no grouped kernel serves the
device and dtype (chosen once: :func:`select_expert_kernel`). Outside the parameter tensors each
expert keeps its global name: ``state_dict()`` lists ``experts.<e>.w_up.weight`` per expert, and
the checkpoint does the same (:func:`expert_key`), so exports and checkpoints written by a
per-expert model read and write unchanged. Expert parallelism keeps a rank's rows
(:meth:`GroupedExperts.keep`).

Legend: A rows (sorted by expert), D d_model, F d_ff, El local experts, N rows of one expert.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import expert_dropout

EXPERT_KERNELS = ("auto", "grouped", "loop")


class Expert(nn.Module):
    """One dense MLP (the shared expert). 'swiglu': down(silu(gate(x)) * up(x)); 'silu_mlp': down(silu(up(x)))."""

    def __init__(self, d_model: int, d_ff: int, expert_type: str, dropout: float = 0.0) -> None:
        super().__init__()
        _check_expert_type(expert_type)
        self.dropout = dropout  # on the hidden units, in training (it runs on the token's rank: torch's RNG)
        self.w_gate = nn.Linear(d_model, d_ff, bias=False) if expert_type == "swiglu" else None
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        h_NF = F.silu(self.w_gate(x_ND)) * self.w_up(x_ND) if self.w_gate is not None else F.silu(self.w_up(x_ND))
        return self.w_down(F.dropout(h_NF, self.dropout, self.training))


def _check_expert_type(expert_type: str) -> None:
    if expert_type not in ("swiglu", "silu_mlp"):
        raise ValueError(f"expert_type: expected 'swiglu' or 'silu_mlp', found {expert_type!r}")


# ----------------------------------------------------------------------------- stacked experts
def expert_key(stacked_name: str, expert: int) -> str:
    """The per-expert name of row ``expert`` of a stacked matrix: ``...experts.w_up`` ->
    ``...experts.<expert>.w_up.weight`` (the name a checkpoint and ``state_dict()`` use)."""
    prefix, matrix = stacked_name.rsplit(".", 1)
    return f"{prefix}.{expert}.{matrix}.weight"


def stacked_experts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{stacked parameter name: (global id of row 0, rows)} for every expert matrix of ``model``."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            for matrix in mod.matrices:
                out[f"{mod_name}.{matrix}" if mod_name else matrix] = (mod.first, mod.num_local)
    return out


def expert_rows(model: nn.Module, name: str) -> "list[str] | None":
    """The per-expert names of the rows of parameter ``name`` of ``model`` when it is a stacked expert
    matrix (row ``j`` is ``expert_key(name, first + j)``); None for any other parameter."""
    path, _, matrix = name.rpartition(".")
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return None
    if not isinstance(mod, GroupedExperts) or matrix not in mod.matrices:
        return None
    return [expert_key(name, e) for e in mod.ids]


def per_expert_fill(model: nn.Module, fill: Callable[[str, torch.Tensor], None]) -> Callable[[str, torch.Tensor], None]:
    """``fill(name, tensor)`` that knows per-expert names only (a checkpoint or export reader, the
    initialiser) made to take ``model``'s stacked expert matrices too: row by row, each under its
    expert's name."""
    def fill_any(name: str, t: torch.Tensor) -> None:
        rows = expert_rows(model, name)
        if rows is None:
            fill(name, t)
            return
        for key, t_row in zip(rows, t):
            fill(key, t_row)
    return fill_any


def _grouped_mm(x_AD: torch.Tensor, w_EFD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows of group e times ``w_EFD[e].T``: one grouped GEMM (rows past ``offs_E[-1]`` are not read).

    Under ``torch.compile`` only bf16 is traced: the compiler's shape function of ``_grouped_mm``
    accepts bf16 alone (torch 2.13), so other dtypes run it eagerly, one graph break each.

    Autocast has no rule for ``_grouped_mm`` (it would run in fp32 where the loop's matmuls run in the
    autocast dtype), so under autocast both operands are cast here, as autocast casts a matmul's."""
    device_type = x_AD.device.type
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        x_AD, w_EFD = x_AD.to(low), w_EFD.to(low)
    if x_AD.dtype == torch.bfloat16 or not torch.compiler.is_compiling():
        return torch._grouped_mm(x_AD, w_EFD.transpose(-2, -1), offs=offs_E)
    return _eager_grouped_mm()(x_AD, w_EFD.transpose(-2, -1), offs=offs_E)


_EAGER_GROUPED_MM: list[Callable[..., torch.Tensor]] = []


def _eager_grouped_mm() -> Callable[..., torch.Tensor]:
    """``torch._grouped_mm`` kept out of the compiled graph. Made on first use: ``torch.compiler.disable``
    imports dynamo (about 70 MB of memory a process), which an eager run never needs. (A plain list, not
    ``lru_cache``: dynamo warns when it traces through a cache wrapper.)"""
    if not _EAGER_GROUPED_MM:
        _EAGER_GROUPED_MM.append(torch.compiler.disable(torch._grouped_mm))
    return _EAGER_GROUPED_MM[0]


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs on this device type and dtype (probed once on a tiny case)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        dev = torch.device(device_type)
        x = torch.ones(8, 16, dtype=dtype, device=dev)
        w = torch.ones(2, 16, 16, dtype=dtype, device=dev)
        offs = torch.tensor([3, 8], dtype=torch.int32, device=dev)
        _grouped_mm(x, w, offs)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class GroupedExperts(nn.Module):
    """The experts of one layer held by this process, stacked (see the module docstring).

    ``forward(x_AD, counts_El, key_A) -> y_AD``: ``x_AD`` rows sorted by local expert, ``counts_El`` (on
    the device) how many rows each expert gets, ``key_A`` each row's dropout key (``model/dropout.py``;
    needed in training when ``dropout`` > 0). Every expert's matrices get a gradient on every step
    (an exact zero when it got no rows), so the parameters with gradients are the same on every
    step and rank, as ZeRO's hooks and ZeRO-3's collective gathers require.
    """

    def __init__(self, d_model: int, d_ff: int, expert_type: str, num_experts: int, dropout: float = 0.0) -> None:
        super().__init__()
        _check_expert_type(expert_type)
        self.first, self.num_local = 0, num_experts
        self.dropout = dropout  # between silu and w_down, in training
        self.kernel = "auto"  # resolved on first use, or by select_expert_kernel at build
        # No device named on purpose: parameters are made where model.build puts the whole model.
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_ff, d_model)) if expert_type == "swiglu" else None
        self.w_up = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self._register_state_dict_hook(_per_expert_state)
        self._register_load_state_dict_pre_hook(_stacked_state, with_module=True)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Linear``'s default, per expert: uniform in +-1/sqrt(fan_in) (the LM re-initialises every
        parameter by name; this serves a layer built on its own). A no-op on the meta device."""
        for matrix in self.matrices:
            w = getattr(self, matrix)
            if not w.is_meta:
                bound = 1.0 / math.sqrt(w.shape[-1])
                w.uniform_(-bound, bound)

    @property
    def matrices(self) -> tuple[str, ...]:
        return ("w_gate", "w_up", "w_down") if self.w_gate is not None else ("w_up", "w_down")

    @property
    def ids(self) -> range:
        """Global ids of the experts held, in row order."""
        return range(self.first, self.first + self.num_local)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - a parameter, buffer, module or expert row
        """Also ``experts.<e>`` for a held global id ``e``: that expert's rows (:class:`ExpertRows`), so
        the per-expert names ``state_dict()`` gives resolve as attributes, as torch's
        ``get_model_state_dict`` / ``set_model_state_dict`` resolve every key they are given."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.isdigit() and "first" in self.__dict__ and int(name) in self.ids:
                return ExpertRows(self, int(name) - self.first)
            raise

    def keep(self, ids: range) -> None:
        """Keep only the experts ``ids`` (a contiguous range of the held ones): expert parallelism."""
        if not ids or ids.step != 1 or ids.start < self.first or ids.stop > self.first + self.num_local:
            raise ValueError(f"keep({ids}): expected a non-empty contiguous sub-range of the held experts {self.ids}")
        lo = ids.start - self.first
        for matrix in self.matrices:
            p = getattr(self, matrix)
            setattr(self, matrix, nn.Parameter(p.detach()[lo:lo + len(ids)].clone(), requires_grad=p.requires_grad))
        self.first, self.num_local = ids.start, len(ids)

    def forward(self, x_AD: torch.Tensor, counts_El: torch.Tensor,
                key_A: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.kernel == "auto":
            self.kernel = "grouped" if grouped_mm_supported(x_AD.device.type, self.w_up.dtype) else "loop"
        drop = self.dropout if self.training else 0.0
        if drop > 0 and key_A is None:
            raise ValueError("GroupedExperts: dropout in training needs each row's key (key_A), which the "
                             "dispatcher passes")
        if self.kernel == "loop":
            return self._loop(x_AD, counts_El, key_A, drop)
        offs_El = torch.cumsum(counts_El, 0, dtype=torch.int32)
        up_AF = _grouped_mm(x_AD, self.w_up, offs_El)
        h_AF = F.silu(_grouped_mm(x_AD, self.w_gate, offs_El)) * up_AF if self.w_gate is not None else F.silu(up_AF)
        if drop > 0:
            h_AF = expert_dropout(h_AF, key_A, drop)
        return _grouped_mm(h_AF, self.w_down, offs_El)

    def _loop(self, x_AD: torch.Tensor, counts_El: torch.Tensor, key_A: Optional[torch.Tensor],
              drop: float) -> torch.Tensor:
        """One matmul chain per expert on its slice: the fallback where no grouped kernel runs
        (one host sync per call: the slice bounds)."""
        outs = []
        sizes = counts_El.tolist()
        keys = key_A.split(sizes) if drop > 0 else [None] * len(sizes)
        for j, (x_ND, key_N) in enumerate(zip(x_AD.split(sizes), keys)):
            up_NF = x_ND @ self.w_up[j].T
            h_NF = F.silu(x_ND @ self.w_gate[j].T) * up_NF if self.w_gate is not None else F.silu(up_NF)
            if drop > 0:
                h_NF = expert_dropout(h_NF, key_N, drop)
            outs.append(h_NF @ self.w_down[j].T)
        return torch.cat(outs, 0) if outs else x_AD


class ExpertRows:
    """Expert ``first + j`` of a :class:`GroupedExperts`, seen the way its state-dict names read:
    ``rows.w_up.weight`` is row ``j`` of the stacked ``w_up`` (a view: writes reach the parameter)."""

    def __init__(self, experts: GroupedExperts, j: int) -> None:
        self._experts, self._j = experts, j

    def __getattr__(self, matrix: str) -> Any:  # noqa: ANN401
        if matrix.startswith("_") or matrix not in self._experts.matrices:
            raise AttributeError(f"expert {self._experts.first + self._j} has no matrix {matrix!r}; "
                                 f"it has {self._experts.matrices}")
        return _Weight(getattr(self._experts, matrix)[self._j])


class _Weight:
    """``<matrix>.weight`` of one expert: what an ``nn.Linear`` would hold."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


def _per_expert_state(module: GroupedExperts, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """``state_dict`` hook: each stacked matrix becomes one entry per expert, under its global name.

    ``state_dict(keep_vars=True)`` gives live views of the parameters (loaders write through them);
    a plain ``state_dict()`` gives each expert a tensor of its own, so ``torch.save`` of it is what a
    per-expert model would save."""
    rows = {m: state.pop(prefix + m) for m in module.matrices}
    for j, e in enumerate(module.ids):
        for m in module.matrices:
            row = rows[m][j]
            state[f"{prefix}{e}.{m}.weight"] = row if isinstance(rows[m], nn.Parameter) else row.clone()


def _stacked_state(module: GroupedExperts, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    """``load_state_dict`` pre-hook: per-expert entries of the held experts are stacked back. A
    matrix with any of them missing is left alone, so ``load_state_dict`` reports it."""
    for m in module.matrices:
        keys = [f"{prefix}{e}.{m}.weight" for e in module.ids]
        if all(k in state for k in keys):
            state[prefix + m] = torch.stack([state.pop(k) for k in keys])


def select_expert_kernel(model: nn.Module, requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Set how every :class:`GroupedExperts` of ``model`` computes: 'grouped' (``torch._grouped_mm``)
    or 'loop'. ``requested`` 'auto' takes grouped where it runs on ``device`` in ``dtype``; 'grouped'
    where it does not raises. Returns the kernel chosen."""
    if requested not in EXPERT_KERNELS:
        raise ValueError(f"parallel.expert_kernel: expected one of {EXPERT_KERNELS}, found {requested!r}")
    supported = grouped_mm_supported(torch.device(device).type, dtype)
    if requested == "grouped" and not supported:
        raise ValueError(f"parallel.expert_kernel is 'grouped' but torch._grouped_mm does not run on "
                         f"{torch.device(device).type} in {dtype} with torch {torch.__version__}; use 'auto' or 'loop'")
    kernel = requested if requested != "auto" else ("grouped" if supported else "loop")
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.kernel = kernel
    return kernel
