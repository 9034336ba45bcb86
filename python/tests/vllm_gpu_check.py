"""GPU check of the vLLM plugin (`--load-format safeshard`); not part of the CPU suite.

    python python/tests/vllm_gpu_check.py [--preset llama3-8b] [--layers 4] [--repeat 2]
                                          [--serve] [--device cpu]

Needs CUDA, vLLM 0.33 and this package installed (its `vllm.general_plugins` entry point).
One process, world size 1 on the current GPU: writes a synthetic checkpoint (bf16 shapes of
the preset), builds the model vLLM picks twice on the GPU and loads one with vLLM's default
loader and one with the plugin (through `vllm.plugins.load_general_plugins()` and
`get_model_loader`), alternating, `--repeat` times each (the files are in the page cache
after the first read); then checks every `state_dict()` tensor equal bit for bit and prints
per load: seconds, GB/s of the rank's bytes, the plugin's plan/read/copy split, and a plain
host-to-device copy of the same bytes (pinned and pageable) as the bar. `--serve` also starts
`vllm.LLM(load_format="safeshard")` and the default once each and compares 8 greedy tokens.
Prints one line per check and exits 1 on a failure. `--device cpu` runs the same on the CPU
(vLLM's CPU build; the bar is then a memcpy into touched memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import tempfile
import time


def check(name: str, ok: bool) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def h2d_bar(nbytes: int) -> tuple[float, float]:
    """Seconds for one host-to-device copy of `nbytes` from pinned and from pageable memory."""
    import torch

    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = []
    for pinned in (True, False):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        host.fill_(1)
        dev.copy_(host)
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
        del host
    del dev
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", help="use this checkpoint instead of writing one")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--device", default="cuda",
                    help="cuda (default) or cpu: the same run on the CPU (VLLM_TARGET_DEVICE=cpu)")
    a = ap.parse_args()
    cpu = a.device == "cpu"
    if cpu:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import torch

    if not cpu and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    import safeshard
    import vllm.plugins
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import DefaultModelLoader, get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.model_executor.model_loader.weight_tying import maybe_retie_word_embeddings
    from vllm.utils.torch_utils import set_default_torch_dtype

    def sync() -> None:
        if not cpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    vllm.plugins.load_general_plugins()
    tmp = tempfile.TemporaryDirectory(prefix="safeshard-vgpu-")
    ckpt = a.dir
    if ckpt is None:
        ckpt = tmp.name
        t = time.perf_counter()
        safeshard.synth(ckpt, a.preset, layers=a.layers)
        print(f"synth {a.preset} ({a.layers} layers) in {time.perf_counter() - t:.1f} s", flush=True)
    args = EngineArgs(
        model=ckpt,
        load_format="safeshard",
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=64,
        **({"distributed_executor_backend": "mp"} if cpu else {"gpu_memory_utilization": 0.5}),
    )
    vllm_config = args.create_engine_config()
    model_config = vllm_config.model_config
    results = []
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
            local_rank=0,
            backend="gloo" if cpu else "nccl",
        )
        initialize_model_parallel(1, 1)

        def build() -> torch.nn.Module:
            vllm_config.compilation_config.static_forward_context.clear()
            with set_default_torch_dtype(model_config.dtype), torch.device(a.device):
                return initialize_model(vllm_config=vllm_config, model_config=model_config)

        plugin = get_model_loader(vllm_config.load_config)
        results.append(check(f"vLLM picks the plugin ({type(plugin).__name__})",
                             type(plugin).__name__ == "SafeshardModelLoader"))
        default = DefaultModelLoader(
            dataclasses.replace(vllm_config.load_config, load_format="safetensors")
        )
        times: dict[str, list[float]] = {"default": [], "safeshard": []}
        kept: dict[str, torch.nn.Module] = {}
        for _ in range(a.repeat):
            for name, loader in (("safeshard", plugin), ("default", default)):
                kept.pop(name, None)
                sync()
                model = build()
                sync()
                t = time.perf_counter()
                loader.load_weights(model, model_config)
                sync()
                times[name].append(time.perf_counter() - t)
                maybe_retie_word_embeddings(model, model_config)
                kept[name] = model
                if name == "safeshard":
                    s = plugin.stats
                    print(f"  safeshard: plan {s.get('plan_seconds', 0):.3f} s, read "
                          f"{s.get('load_seconds', 0):.3f} s, copy {s.get('copy_seconds', 0):.3f} s",
                          flush=True)
        results.append(check(f"the plugin loaded with safeshard ({plugin.fallback_reason or 'no fallback'})",
                             plugin.used == "safeshard"))
        want = kept["default"].state_dict()
        got = kept["safeshard"].state_dict()
        same = want.keys() == got.keys() and all(
            want[k].dtype == got[k].dtype
            and want[k].shape == got[k].shape
            and torch.equal(want[k].reshape(-1).view(torch.uint8), got[k].reshape(-1).view(torch.uint8))
            for k in want
        )
        results.append(check(f"state_dict equal to the default loader's ({len(want)} tensors)", same))
        nbytes = sum(t.numel() * t.element_size() for t in got.values())
        del kept, want, got
        sync()
        gb = nbytes / 1e9
        for name, ts in times.items():
            print(f"{name:9}: " + ", ".join(f"{x:.2f} s ({gb / x:.1f} GB/s)" for x in ts), flush=True)
        if cpu:
            src = torch.ones(nbytes, dtype=torch.uint8)
            dst = torch.zeros(nbytes, dtype=torch.uint8)
            t = time.perf_counter()
            dst.copy_(src)
            x = time.perf_counter() - t
            print(f"bar      : memcpy of {gb:.2f} GB into touched memory {x:.2f} s ({gb / x:.1f} GB/s)",
                  flush=True)
            del src, dst
        else:
            pinned, pageable = h2d_bar(nbytes)
            print(f"bar      : H2D of {gb:.2f} GB: pinned {pinned:.2f} s ({gb / pinned:.1f} GB/s), "
                  f"pageable {pageable:.2f} s ({gb / pageable:.1f} GB/s)", flush=True)
    if a.serve:
        from vllm import LLM, SamplingParams

        tokens = {}
        for fmt in ("safeshard", "safetensors"):
            t = time.perf_counter()
            llm = LLM(model=ckpt, load_format=fmt, skip_tokenizer_init=True, enforce_eager=True,
                      max_model_len=64, gpu_memory_utilization=0.4)
            out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}],
                               SamplingParams(max_tokens=8, temperature=0.0, detokenize=False))
            tokens[fmt] = list(out[0].outputs[0].token_ids)
            print(f"LLM(load_format={fmt!r}): up and generated in {time.perf_counter() - t:.1f} s: "
                  f"{tokens[fmt]}", flush=True)
            del llm
            torch.cuda.empty_cache()
        results.append(check("same greedy tokens", tokens["safeshard"] == tokens["safetensors"]))
    tmp.cleanup()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
