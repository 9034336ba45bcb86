"""`--load-format safeshard` against vLLM's default loader, on CPU, every rank of a tp x pp
gloo world (the setup of vllm_world.py).

Run as `python plugin_world.py CKPT OUT.json TP PP PORT [ep]` (`ep`: vLLM's
`enable_expert_parallel`). The parent loads vLLM's general
plugins (so the loader comes through the package's real `vllm.general_plugins` entry point),
builds the engine config with `load_format="safeshard"` once, then forks one process per
rank. Each rank builds the model vLLM picks twice: one loaded by vLLM's own
`DefaultModelLoader`, one by `get_model_loader(load_config)`, i.e. the plugin. Before loading,
every parameter of both models is set to the same byte pattern (buffers keep their
constructed values), so that a tensor one loader writes and the other does not is a
difference too, never uninitialized memory.
After loading and vLLM's re-tying of embeddings, every `state_dict()` entry must be equal in
name, dtype, shape and bytes, and the same names must share storage. Each rank writes what
the plugin did (safeshard or the default, and why) and the differences into OUT.json.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from vllm_world import fork_ranks  # noqa: E402  (after the environment above)

PATTERN = 0xA5


def main() -> None:
    ckpt, out, tp, pp, port = sys.argv[1:6]
    tp, pp = int(tp), int(pp)
    flags = sys.argv[6:]
    ep = "ep" in flags
    # skew=DIR: rank 1's plugin reads DIR, a copy of CKPT whose files differ in length only
    # (the plan hashes must disagree, and every rank must say so).
    skew = next((f[len("skew="):] for f in flags if f.startswith("skew=")), None)
    import torch

    torch.set_num_threads(1)
    import vllm.plugins
    from vllm.engine.arg_utils import EngineArgs

    vllm.plugins.load_general_plugins()
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    extra = {}
    # As in vllm_world.py: the checkpoint's dtype (vLLM's CPU platform would turn float32
    # into bfloat16) and GPT-2's activation without vLLM's C extension.
    if cfg.get("torch_dtype") in ("float32", "float16", "bfloat16"):
        extra["dtype"] = cfg["torch_dtype"]
    # dtype=X: serve in X instead (both loaders convert while copying).
    for f in flags:
        if f.startswith("dtype="):
            extra["dtype"] = f[len("dtype="):]
    if cfg.get("model_type") == "gpt2" and not hasattr(torch.ops._C, "gelu_new"):
        extra["hf_overrides"] = {"activation_function": "gelu"}
    args = EngineArgs(
        **extra,
        model=ckpt,
        load_format="safeshard",
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=32,
        distributed_executor_backend="mp",
        enable_expert_parallel=ep,
    )
    vllm_config = args.create_engine_config()
    def run_rank(rank: int) -> None:
        result = load_rank(vllm_config, tp, pp, rank, port, skew if rank == 1 else None)
        with open(f"{out}.rank{rank}", "w") as f:
            json.dump(result, f)

    fork_ranks(tp * pp, run_rank)
    ranks = []
    for rank in range(tp * pp):
        with open(f"{out}.rank{rank}") as f:
            ranks.append(json.load(f))
        os.remove(f"{out}.rank{rank}")
    with open(out, "w") as f:
        json.dump(ranks, f)


def fill_pattern(model) -> None:
    """Sets every parameter (torch.empty at construction: whatever memory held) to one byte
    pattern; buffers keep the values the model's constructor gave them, as in vLLM."""
    import torch

    with torch.no_grad():
        for t in model.parameters():
            if t.numel() == 0:
                continue
            flat = t.reshape(-1)
            if flat.data_ptr() == t.data_ptr() and t.is_contiguous():
                flat.view(torch.uint8).fill_(PATTERN)
            else:
                t.zero_()


def load_rank(vllm_config, tp, pp, rank, port, skew) -> dict:
    import dataclasses

    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader import DefaultModelLoader, get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.model_executor.model_loader.weight_tying import maybe_retie_word_embeddings
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

        def build():
            # A second model in one process: vLLM registers attention layers by name.
            vllm_config.compilation_config.static_forward_context.clear()
            with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):
                model = initialize_model(vllm_config=vllm_config, model_config=model_config)
            fill_pattern(model)
            return model

        default = DefaultModelLoader(
            dataclasses.replace(vllm_config.load_config, load_format="safetensors")
        )
        expected = build()
        default.load_weights(expected, model_config)
        maybe_retie_word_embeddings(expected, model_config)
        want = snapshot(expected)
        del expected

        loader = get_model_loader(vllm_config.load_config)
        got_model = build()
        if skew is not None:
            # The default loader above read model_config.model; the plugin reads this.
            model_config.model_weights = skew
        try:
            loader.load_weights(got_model, model_config)
        except Exception as e:  # noqa: BLE001 - reported to the driver, which expects it or not
            return {"rank": rank, "loader": type(loader).__name__, "error": f"{type(e).__name__}: {e}"}
        maybe_retie_word_embeddings(got_model, model_config)
        got = snapshot(got_model)

    problems = []
    for name in sorted(set(want) | set(got)):
        if name not in got:
            problems.append(f"rank {rank}: {name}: in the default load's state_dict only")
            continue
        if name not in want:
            problems.append(f"rank {rank}: {name}: in the plugin's state_dict only")
            continue
        (w, wa), (g, ga) = want[name], got[name]
        if w.dtype != g.dtype:
            problems.append(f"rank {rank}: {name}: dtype {g.dtype} (plugin) != {w.dtype} (default)")
        elif tuple(w.shape) != tuple(g.shape):
            problems.append(
                f"rank {rank}: {name}: shape {tuple(g.shape)} (plugin) != {tuple(w.shape)} (default)"
            )
        elif not torch.equal(w.reshape(-1).view(torch.uint8), g.reshape(-1).view(torch.uint8)):
            problems.append(f"rank {rank}: {name}: bytes differ")
        if wa != ga:
            problems.append(f"rank {rank}: {name}: shares storage with {ga} (plugin) vs {wa} (default)")
    return {
        "rank": rank,
        "loader": type(loader).__name__,
        "used": getattr(loader, "used", None),
        "reason": getattr(loader, "fallback_reason", None),
        "stats": getattr(loader, "stats", {}),
        "tensors": len(want),
        "bytes": sum(t.numel() * t.element_size() for t, _ in want.values()),
        "problems": problems,
    }


def snapshot(model) -> dict:
    """name -> (contiguous copy, sorted names sharing its storage)."""
    state = model.state_dict()
    by_ptr = {}
    for name, t in state.items():
        if t.numel():
            by_ptr.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), []).append(name)
    out = {}
    for names in by_ptr.values():
        for n in names:
            out[n] = (state[n].detach().contiguous().clone(), sorted(names))
    for name, t in state.items():
        if not t.numel():
            out[name] = (t.detach().clone(), [name])
    return out


if __name__ == "__main__":
    main()
