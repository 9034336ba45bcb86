"""vLLM's own load on CPU, every rank of a tp x pp gloo world: the differential's ground truth.

Run as `python vllm_world.py CKPT OUT TP PP PORT [LOADER]`. The parent imports vLLM and builds the
engine config once, then forks one process per rank (imports dominate the run time). Each
rank builds the model vLLM picks from CKPT/config.json, loads it with vLLM's
`DefaultModelLoader.load_weights`, re-ties embeddings as vLLM does after loading, and
writes this rank's `state_dict()` to OUT/rank{RANK}.safetensors plus OUT/rank{RANK}.json:
the names `load_weights` reported as loaded, which names share storage, and for every
fused parameter the checkpoint parts (vLLM's `packed_modules_mapping`) and for every
FusedMoE layer its local-to-global expert ids.

LOADER `sharded_state` loads CKPT (a `safeshard reshard --format vllm` output) with vLLM's
`ShardedStateLoader.load_weights` instead (no re-tying: vLLM's sharded path never unties).
"""

import json
import os
import sys

# vLLM must pick its CPU platform; no GPU is used or needed.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ckpt, out, tp, pp, port = sys.argv[1:6]
    loader_name = sys.argv[6] if len(sys.argv) > 6 else "safetensors"
    tp, pp = int(tp), int(pp)
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.model_executor.model_loader.weight_tying import (
        maybe_retie_word_embeddings,
    )
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.utils.torch_utils import set_default_torch_dtype

    # vLLM's NewGELU needs the compiled `_C.gelu_new` at construction, which a CPU install
    # without vLLM's C extension lacks; the activation does not change which weights load.
    overrides = {}
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    model_type = cfg.get("model_type")
    # vLLM's CPU platform turns a float32 model into bfloat16; keep the checkpoint's dtype so
    # that the bytes compare (safeshard never converts).
    disk_dtype = cfg.get("torch_dtype")
    if disk_dtype in ("float32", "float16", "bfloat16"):
        extra_dtype = {"dtype": disk_dtype}
    else:
        extra_dtype = {}
    if model_type == "gpt2" and not hasattr(torch.ops._C, "gelu_new"):
        overrides["activation_function"] = "gelu"
    extra = {"hf_overrides": overrides} if overrides else {}
    extra.update(extra_dtype)
    args = EngineArgs(
        **extra,
        model=ckpt,
        load_format=loader_name,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=32,
        distributed_executor_backend="mp",
    )
    vllm_config = args.create_engine_config()
    os.makedirs(out, exist_ok=True)
    fork_ranks(tp * pp, lambda rank: load_rank(vllm_config, out, tp, pp, rank, port, loader_name))


def fork_ranks(world: int, run_rank) -> None:
    """Runs `run_rank(rank)` in one forked process per rank of `world` and waits for all;
    exits naming the ranks that failed. Shared with plugin_world.py."""
    children = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # A rank must not outlive its parent (killed by a timeout): it would wait in
                # a collective forever.
                import ctypes

                ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
                run_rank(rank)
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = rank
    failed = []
    while children:
        pid, status = os.wait()
        rank = children.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(rank)
            # One failed rank leaves the others waiting in a collective: stop them.
            for other in children:
                os.kill(other, 9)
    if failed:
        sys.exit(f"vLLM load failed on rank(s) {sorted(failed)}")


def load_rank(vllm_config, out, tp, pp, rank, port, loader_name="safetensors") -> None:
    import torch
    from safetensors.torch import save_file
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.model_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.model_executor.model_loader.weight_tying import (
        maybe_retie_word_embeddings,
    )
    from vllm.utils.torch_utils import set_default_torch_dtype

    model_config = vllm_config.model_config
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=tp * pp,
            rank=rank,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            local_rank=rank,
            backend="gloo",
        )
        initialize_model_parallel(tp, pp)
        if loader_name == "sharded_state":
            from vllm.model_executor.model_loader.sharded_state_loader import (
                ShardedStateLoader,
            )

            loader = ShardedStateLoader(vllm_config.load_config)
        else:
            loader = DefaultModelLoader(vllm_config.load_config)
        with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):
            model = initialize_model(vllm_config=vllm_config, model_config=model_config)
        # DefaultModelLoader.load_weights drops the set of names the model reports as
        # loaded; keep it, so that parameters vLLM never fills are not compared.
        loaded_sets = []
        model_load = model.load_weights

        def recording_load(weights):
            names = model_load(weights)
            loaded_sets.append(names)
            return names

        model.load_weights = recording_load
        loader.load_weights(model, model_config)
        loaded = sorted(loaded_sets[0]) if loaded_sets and loaded_sets[0] is not None else None
        if loader_name != "sharded_state":
            maybe_retie_word_embeddings(model, model_config)

    state = model.state_dict()
    tensors = {}
    by_ptr = {}
    aliases = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in by_ptr:
            aliases[name] = by_ptr[key]
            continue
        by_ptr[key] = name
        tensors[name] = t.detach().contiguous().clone()

    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    experts = {}
    for mname, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            emap = getattr(module, "expert_map", None)
            if emap is None:
                ids = list(range(module.local_num_experts))
            else:
                ids = [0] * module.local_num_experts
                for g, l in enumerate(emap.tolist()):
                    if l >= 0:
                        ids[l] = g
            experts[mname] = ids
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    meta = {
        "class": type(model).__name__,
        "aliases": aliases,
        "packed": packed,
        "experts": experts,
        "loaded": loaded,
        "dtype": str(model_config.dtype),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main()
