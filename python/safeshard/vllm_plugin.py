"""vLLM plugin: ``--load-format safeshard``.

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point of this package
and calls it in every process; it registers :class:`SafeshardModelLoader` as the load format
``safeshard``. ``import safeshard`` never imports this module (nor vLLM, nor torch).

What a load does, on every rank of vLLM's world group:

1. Takes vLLM's tensor/pipeline ranks and sizes (and the data-parallel rank when expert
   parallelism places whole experts) from ``vllm.distributed``, and vLLM's layer split
   (``get_pp_indices``, which honours ``VLLM_PP_LAYER_PARTITION``) as the plan's explicit
   layers per stage.
2. Plans the checkpoint with safeshard (headers only) with tensor names as vLLM's
   ``state_dict()`` has them (fused ``qkv_proj``/``gate_up_proj``, stacked FusedMoE experts,
   ...; the name maps are data next to the library's specs), and checks this rank's tensors
   against the model: every one is a tensor of ``model.state_dict()`` with the same dtype (or a
   float dtype that ``copy_`` converts as vLLM's weight loaders do) and a shape no larger, and
   every parameter vLLM fills from a checkpoint is covered.
3. All-gathers every rank's verdict and plan hash over vLLM's world group (gloo): if any rank
   cannot prove its load equal to vLLM's default, every rank falls back to vLLM's
   ``DefaultModelLoader`` with one log line saying why; ranks whose plan hashes differ are one
   error naming them.
4. Loads only this rank's bytes (the GIL released). On the CPU, every tensor that has its
   parameter's exact dtype and shape is read straight into the parameter (one copy); the
   rest, and on a GPU every tensor, go into one arena (pinned host memory for a GPU) and are
   copied into their parameter or buffer (narrowed where vLLM padded the parameter, as
   vLLM's ``ShardedStateLoader`` does). A rank whose embedding equals the stored head of a
   tied config holds it once (``Rank.aliases``); both parameters get its values, and vLLM
   re-ties them after the load as it does after its own.

``model_loader_extra_config`` may set ``io`` (``auto``, ``mmap``, ``pread``, ``direct``),
``threads``, ``spec`` (a shipped spec name or a ``.shard`` file) and ``pinned`` (default true:
for a model on the GPU, read the rank into pinned host memory and copy each tensor to the
device asynchronously; false: a pageable arena and two pinned staging buffers). See
docs/vllm.md.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from . import SafeshardError, _dtypes, _error
from . import plan as plan_checkpoint

if TYPE_CHECKING:
    from . import Plan

# Under vLLM's own logger ("vllm"), whose handler and VLLM_LOGGING_LEVEL apply: a logger
# named after this module has no handler, and its INFO lines were never shown.
logger = init_logger("vllm.safeshard")

LOAD_FORMAT = "safeshard"

# Float dtypes that vLLM's weight loaders convert between with `copy_` (a checkpoint in
# bfloat16 served as float16, ...); any other dtype difference is not ours to decide.
_CONVERTIBLE = (torch.float16, torch.bfloat16, torch.float32)

# Parameters that fbgemm_fp8 builds from its config; checkpoints never carry them (vLLM's
# `_CONFIG_BUILT_PARAMS`).
_CONFIG_BUILT = ("input_scale_ub",)


class Fallback(Exception):
    """This rank cannot prove a safeshard load equal to vLLM's default; the message says why
    (one line)."""


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the ``safeshard`` load format."""
    register_model_loader(LOAD_FORMAT)(SafeshardModelLoader)


@dataclasses.dataclass
class _Where:
    """This process's place in vLLM's job, in safeshard's terms."""

    tp: int
    pp: int
    dp: int
    ep: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    world_rank: int
    pp_layers: list[int] | None

    @property
    def plan_rank(self) -> int:
        # safeshard orders ranks TP fastest, then PP, then DP (as vLLM does).
        return (self.dp_rank * self.pp + self.pp_rank) * self.tp + self.tp_rank


class SafeshardModelLoader(BaseModelLoader):  # type: ignore[misc]  # vLLM's types are not followed
    """vLLM model loader that reads each rank's slices with safeshard (see the module doc)."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        where = f"model_loader_extra_config for load format {LOAD_FORMAT}"
        self.io = extra.pop("io", "auto")
        if self.io not in ("auto", "mmap", "pread", "direct"):
            raise ValueError(f"{where}: io={self.io!r}: expected auto, mmap, pread or direct")
        self.pinned = extra.pop("pinned", True)
        if not isinstance(self.pinned, bool):
            raise ValueError(f"{where}: pinned={self.pinned!r}: expected true or false")
        self.threads = extra.pop("threads", None)
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads > 0):
            raise ValueError(f"{where}: threads={self.threads!r}: expected a positive integer")
        self.spec = extra.pop("spec", None)
        if self.spec is not None and not isinstance(self.spec, str):
            raise ValueError(f"{where}: spec={self.spec!r}: expected a spec name or .shard file")
        if extra:
            raise ValueError(
                f"{where}: unexpected key(s) {sorted(extra)}; expected io, threads, spec, pinned"
            )
        # The fallback: vLLM's own loader as `--load-format auto` would run it.
        self.default = DefaultModelLoader(
            dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})
        )
        # What the last load_weights did, for callers and tests: "safeshard" or "default",
        # and why it fell back.
        self.used: str | None = None
        self.fallback_reason: str | None = None
        self.stats: dict[str, Any] = {}

    def download_model(self, model_config: ModelConfig) -> None:
        self.default.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        t0 = time.perf_counter()
        plan: Plan | None = None
        where: _Where | None = None
        reason: str | None = None
        try:
            where = _where(model_config)
            plan = self._plan(model_config, where)
            _check_rank(plan, where.plan_rank, model, model_config)
        except (Fallback, SafeshardError) as e:
            reason = _one_line(str(e))
        except Exception as e:  # noqa: BLE001
            # Anything else (a vLLM internal this version does not have, ...) must not leave
            # the other ranks waiting in the all-gather below: this rank cannot prove its
            # load, so every rank falls back.
            reason = _one_line(f"{type(e).__name__}: {e}")
        node = os.environ.get("SAFESHARD_NODE") or socket.gethostname()
        verdicts = _all_gather(
            {
                "rank": _world_rank(),
                "hash": None if plan is None else plan.hash,
                "why": reason,
                "node": node,
                "plan_rank": None if where is None else where.plan_rank,
            }
        )
        refusing = [v for v in verdicts if v["why"] is not None]
        if refusing:
            first = refusing[0]
            ranks = _ranks([v["rank"] for v in refusing])
            self.used, self.fallback_reason = "default", first["why"]
            logger.warning(
                "safeshard: loading with vLLM's default loader instead: %s %s: %s",
                "rank" if len(refusing) == 1 else "ranks",
                ranks,
                first["why"],
            )
            self.default.load_weights(model, model_config)
            return
        assert plan is not None and where is not None
        hashes: dict[str, list[int]] = {}
        for v in verdicts:
            hashes.setdefault(v["hash"], []).append(v["rank"])
        if len(hashes) > 1:
            groups = "; ".join(
                f"{_ranks(r)}: {h[:12]}" for h, r in sorted(hashes.items(), key=lambda x: x[1])
            )
            raise _error(
                "comm",
                f"vLLM ranks planned different checkpoints or layouts (plan hashes differ, "
                f"ranks: hash: {groups}); every rank must see the same files and options",
            )
        t1 = time.perf_counter()
        # Into GPU parameters: the rank is read straight into pinned host memory, so every
        # tensor goes to the device by one asynchronous copy (no staging pass).
        to_gpu = any(p.device.type == "cuda" for p in model.parameters())
        out = None
        # Into CPU parameters: every tensor that fits its parameter exactly is read straight
        # into it (one copy, from the file); only the rest go through an arena.
        into = None if to_gpu else _in_place(plan, where.plan_rank, model)
        try:
            if to_gpu and self.pinned:
                size = plan.rank(where.plan_rank).arena_bytes
                out = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            loaded = plan.load(
                where.plan_rank,
                io=self.io,
                threads=self.threads,
                progress=False,
                out=out,
                into=into,
                # The ranks loading beside this one on this machine (one page cache): the
                # spans they read together are asked for whole.
                node_ranks=sorted(
                    {v["plan_rank"] for v in verdicts if v["node"] == node} | {where.plan_rank}
                ),
            )
        except SafeshardError as e:
            # Nothing is copied yet and the default loader needs no other rank: this rank
            # alone can still load as vLLM would (it reads the files again, so a checkpoint
            # that is truly broken fails there too).
            self.used, self.fallback_reason = "default", _one_line(str(e))
            logger.warning(
                "safeshard: loading with vLLM's default loader instead: rank %d: %s",
                where.world_rank,
                self.fallback_reason,
            )
            self.default.load_weights(model, model_config)
            return
        t2 = time.perf_counter()
        _copy_into(model, loaded.torch(), pinned=out is not None)
        _fill_aliases(model, loaded.aliases)
        stats = loaded.stats
        del loaded, out  # the arena goes now, not when this loader does
        t3 = time.perf_counter()
        self.used, self.fallback_reason = "safeshard", None
        self.stats = {
            **stats,
            "plan_seconds": t1 - t0,
            "load_seconds": t2 - t1,
            "copy_seconds": t3 - t2,
            "in_place_tensors": len(into or ()),
        }
        # `stats["bytes"]` counts the arena only, which is empty when every tensor went
        # straight into its parameter: report what the rank holds and read instead.
        logger.info(
            "safeshard: rank %d loaded %.1f MiB (read %.1f MiB from storage, %d tensors "
            "straight into parameters) in %.2f s (plan %.2f s, read %.2f s, copy %.2f s; "
            "io %s on %d threads)",
            where.world_rank,
            plan.rank(where.plan_rank).bytes / 2**20,
            stats["read_bytes"] / 2**20,
            len(into or ()),
            t3 - t0,
            t1 - t0,
            t2 - t1,
            t3 - t2,
            stats.get("io_chosen", "?"),
            stats.get("threads", 0),
        )

    def _plan(self, model_config: ModelConfig, where: _Where) -> Plan:
        path = _checkpoint_dir(self.default, model_config)
        return plan_checkpoint(
            path,
            tp=where.tp,
            pp=where.pp,
            dp=where.dp,
            ep=where.ep,
            spec=self.spec,
            pp_layers=where.pp_layers,
            names="vllm",
        )


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _ranks(ranks: list[int]) -> str:
    return ",".join(str(r) for r in sorted(ranks))


def _world_rank() -> int:
    import torch.distributed as dist

    return int(dist.get_rank()) if dist.is_available() and dist.is_initialized() else 0


def _all_gather(mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's `mine` over vLLM's world group (its CPU/gloo group); just `mine` when
    vLLM runs without a distributed environment."""
    from vllm.distributed import parallel_state

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    try:
        world = parallel_state.get_world_group()
    except AssertionError:  # vLLM's way of saying its world group is not initialized
        return [mine]
    if world.world_size == 1:
        return [mine]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, mine, group=world.cpu_group)
    return [dict(v) for v in out]


def _where(model_config: ModelConfig) -> _Where:
    """vLLM's ranks and sizes, refusing the parallelisms safeshard does not plan."""
    from vllm.config import get_current_vllm_config_or_none
    from vllm.distributed import parallel_state
    from vllm.distributed.utils import get_pp_indices

    vllm_config = get_current_vllm_config_or_none()
    pc = vllm_config.parallel_config if vllm_config is not None else None
    if pc is not None:
        if getattr(pc, "prefill_context_parallel_size", 1) > 1:
            raise Fallback("prefill context parallelism is not planned by safeshard")
        if getattr(pc, "decode_context_parallel_size", 1) > 1:
            raise Fallback("decode context parallelism is not planned by safeshard")
    if parallel_state.model_parallel_is_initialized():
        tp_group, pp_group = parallel_state.get_tp_group(), parallel_state.get_pp_group()
        tp, tp_rank = tp_group.world_size, tp_group.rank_in_group
        pp, pp_rank = pp_group.world_size, pp_group.rank_in_group
    else:
        tp, tp_rank, pp, pp_rank = 1, 0, 1, 0
    dp, dp_rank, ep = 1, 0, 1
    if pc is not None and pc.enable_expert_parallel and model_config.is_moe:
        if pc.enable_eplb:
            raise Fallback(
                "expert parallelism with EPLB (redundant experts) is not planned by safeshard"
            )
        if pc.expert_placement_strategy != "linear":
            raise Fallback(
                f"expert placement {pc.expert_placement_strategy!r} is not planned by "
                "safeshard (linear only)"
            )
        # vLLM's EP ranks are dp_rank * tp + tp_rank over dp * tp ranks, as safeshard's.
        dp = pc.data_parallel_size
        dp_rank = parallel_state.get_dp_group().rank_in_group if dp > 1 else 0
        ep = tp * dp
    pp_layers = None
    if pp > 1:
        layers = int(model_config.hf_text_config.num_hidden_layers)
        pp_layers = []
        for stage in range(pp):
            start, end = get_pp_indices(layers, stage, pp)
            pp_layers.append(end - start)
    return _Where(tp, pp, dp, ep, tp_rank, pp_rank, dp_rank, _world_rank(), pp_layers)


def _checkpoint_dir(default: DefaultModelLoader, model_config: ModelConfig) -> str:
    """The local directory of the checkpoint's safetensors files, as vLLM's default loader
    finds (and, for a Hugging Face repo id, downloads) it."""
    name = model_config.model_weights or model_config.model
    if os.path.isdir(name):
        return str(name)
    finder = DefaultModelLoader(
        dataclasses.replace(default.load_config, load_format="safetensors")
    )
    try:
        folder, _, _, _ = finder._prepare_weights(name, None, model_config.revision, False, None)
    except (RuntimeError, ValueError, OSError) as e:
        raise Fallback(f"{name}: no local safetensors checkpoint ({_one_line(str(e))})") from None
    return str(folder)


def _fillable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a checkpoint must fill: all but those vLLM's default loader lets a
    checkpoint leave out (its `track_weights_loading`): KV-cache scales (defaults when
    absent), empty placeholders and parameters built from the quantization config."""
    from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

    params: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for mname, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        kv_cache = isinstance(method, BaseKVCacheMethod)
        for pname, p in module.named_parameters(recurse=False):
            if kv_cache or p.numel() == 0 or pname in _CONFIG_BUILT:
                params.pop(f"{mname}.{pname}" if mname else pname, None)
    return params


def _check_rank(plan: Plan, rank: int, model: nn.Module, model_config: ModelConfig) -> None:
    """Raises Fallback unless this rank's planned tensors fill the model as vLLM's default
    loader would: names, dtypes and shapes checked against `model.state_dict()`."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if getattr(method, "uses_meta_device", False):
            raise Fallback(
                f"online quantization ({type(method).__name__}) quantizes while loading"
            )
    if getattr(model, "secondary_weights", ()):
        raise Fallback(f"{type(model).__name__} loads secondary weights")
    if getattr(model, "allow_patterns_overrides", None) is not None:
        raise Fallback(f"{type(model).__name__} loads only some of the checkpoint's files")
    if model_config.quantization is not None and not model_config.is_quantized:
        raise Fallback(f"quantization {model_config.quantization!r} is applied while loading")
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        if t.device.type == "meta":
            raise Fallback(f"{name} is on the meta device")
    info = plan.rank(rank)
    planned: dict[str, tuple[str, tuple[int, ...]]] = {
        t.name: (t.dtype, t.shape) for t in info.tensors
    }
    # Names sharing storage (tied embeddings) are filled by filling any one of them.
    storage: dict[tuple[int, tuple[int, ...], torch.dtype], list[str]] = {}
    for name, t in state.items():
        if t.numel():
            storage.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), []).append(name)
    alias = {n: names for names in storage.values() for n in names}
    for name, (dt, shape) in planned.items():
        if name not in state:
            raise Fallback(
                f"safeshard plans {name} for rank {rank}, which {type(model).__name__} "
                "does not have"
            )
        param = state[name]
        tdt = _dtypes.torch_dtype(dt)
        if tdt is None or (
            tdt != param.dtype and not (tdt in _CONVERTIBLE and param.dtype in _CONVERTIBLE)
        ):
            raise Fallback(f"{name}: the checkpoint's {dt} does not load into {param.dtype}")
        if len(shape) != param.dim() or any(s > p for s, p in zip(shape, param.shape)):
            raise Fallback(
                f"{name}: safeshard's shape {list(shape)} does not fit vLLM's "
                f"{list(param.shape)} on rank {rank}"
            )
    for name, p in _fillable_params(model).items():
        if p.numel() == 0:
            continue
        if not any(n in planned for n in alias.get(name, [name])):
            raise Fallback(
                f"rank {rank}: safeshard plans no tensor for {name}, which vLLM loads "
                f"into {type(model).__name__}"
            )


def _in_place(plan: Plan, rank: int, model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers a CPU load can write straight into: those whose tensor
    has exactly their dtype and shape and that are contiguous, and whose memory no other
    chosen one overlaps (tied names share storage; those go through the arena)."""
    state = model.state_dict(keep_vars=True)
    spans: list[tuple[int, int, str, torch.Tensor]] = []
    for t in plan.rank(rank).tensors:
        p = state.get(t.name)
        if p is None or p.device.type != "cpu" or not p.is_contiguous() or p.numel() == 0:
            continue
        if p.dtype != _dtypes.torch_dtype(t.dtype) or tuple(p.shape) != t.shape:
            continue
        start = p.data_ptr()
        spans.append((start, start + t.nbytes, t.name, p))
    spans.sort(key=lambda x: (x[0], x[1]))
    out: dict[str, torch.Tensor] = {}
    end = 0
    for i, (start, stop, name, p) in enumerate(spans):
        nxt = spans[i + 1][0] if i + 1 < len(spans) else stop
        if start >= end and nxt >= stop:
            out[name] = p.detach()
        end = max(end, stop)
    return out


# Pinned staging buffer size for copies into device parameters (two of them).
_STAGE_BYTES = 64 << 20


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], pinned: bool) -> None:
    """Copies every loaded tensor (CPU views of the arena, in arena order) into the model's
    parameter or buffer of that name, narrowed to the tensor's shape where vLLM padded the
    parameter (as ShardedStateLoader does). Into device memory from a `pinned` arena, one
    asynchronous copy per tensor; from a pageable one, byte-identical contiguous copies go
    through two pinned staging buffers (pinned transfer speed, host copies overlapping them,
    no device copy of the whole arena)."""
    state = model.state_dict()
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    devices = set()
    with torch.no_grad():
        for name, src in tensors.items():
            dst = state[name]
            for dim, size in enumerate(src.shape):
                if size < dst.shape[dim]:
                    dst = dst.narrow(dim, 0, size)
            if dst.device.type != "cuda":
                dst.copy_(src)
            elif pinned:
                dst.copy_(src, non_blocking=True)
                devices.add(dst.device)
            elif dst.dtype == src.dtype and dst.is_contiguous():
                staged.append((dst, src))
            else:
                dst.copy_(src)
        if staged:
            _staged_to_device(staged)
        for device in devices:
            # The pinned arena must outlive the copies reading it.
            torch.cuda.current_stream(device).synchronize()


def _fill_aliases(model: nn.Module, aliases: dict[str, str]) -> None:
    """Fills the parameters the loaded rank left out because another of its tensors holds
    their values: an embedding vLLM re-ties to the stored head it equals. The model is still
    untied here, so both parameters get the values; vLLM re-ties them after the load
    (`maybe_retie_word_embeddings`), as after its own."""
    state = model.state_dict()
    with torch.no_grad():
        for name, holder in aliases.items():
            dst, src = state.get(name), state.get(holder)
            if dst is None or src is None or dst.data_ptr() == src.data_ptr():
                continue
            if dst.shape != src.shape:
                raise RuntimeError(
                    f"safeshard: {name} {list(dst.shape)} cannot take the values of {holder} "
                    f"{list(src.shape)}, which the rank holds for both"
                )
            dst.copy_(src)


def _staged_to_device(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """dst.copy_(src) for every (device dst, CPU src) pair of equal dtype and shape, both
    contiguous, through two pinned buffers used in turn: small tensors share a buffer, and
    while one buffer's bytes travel to the device the next ones are copied into the other."""
    device = pairs[0][0].device
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        stages = [torch.empty(_STAGE_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        done = [torch.cuda.Event() for _ in range(2)]  # type: ignore[no-untyped-call, unused-ignore]
        k, fill = 0, 0
        for dst, src in pairs:
            d = dst.reshape(-1).view(torch.uint8)
            s = src.reshape(-1).view(torch.uint8)
            n = s.numel()
            start = 0
            while start < n:
                if fill == _STAGE_BYTES:
                    # This buffer is full: queue its completion, wait for the other one.
                    done[k].record(stream)
                    k ^= 1
                    done[k].synchronize()
                    fill = 0
                m = min(n - start, _STAGE_BYTES - fill)
                stage = stages[k][fill : fill + m]
                stage.copy_(s[start : start + m])
                d[start : start + m].copy_(stage, non_blocking=True)
                fill += m
                start += m
        stream.synchronize()
