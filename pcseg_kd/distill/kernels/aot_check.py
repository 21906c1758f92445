"""Compile the fused kernel for a GPU without having one (``triton.compile`` to cubin).

``python -m pcseg_kd.distill.kernels.aot_check [--arch 90]`` prints, for the main kernel
variants, the registers, stack (spill) bytes and PTX size that ``cuobjdump -res-usage``
reports. It proves the kernel lowers through Triton's CUDA backend and that the tile
choice does not spill; it says nothing about speed. Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from typing import Dict, List

VARIANTS = {
    "dkd+pssm fwd (batchmean)": dict(),
    "dkd+pssm bwd": dict(FWD=False, REDUCE=False, BWD=True),
    "dkd+pssm(probs, both) bwd": dict(FWD=False, REDUCE=False, BWD=True, SPACE_PROBS=True, GATE=2),
    "kd logit-scale bwd + weight grad": dict(MODE=1, KD_LOGIT_SCALE=True, FWD=False, REDUCE=False, BWD=True,
                                             HAS_W=True, NEED_WGRAD=True),
    "omega only": dict(MODE=2, FWD=False, REDUCE=False),
}


def compile_variant(dtype: str = "bf16", arch: int = 90, num_classes: int = 20, **constexprs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import pssm_dkd_triton as tk
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("aot_check needs TRITON_INTERPRET unset")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    br, bc, nw = tk._blocks(num_classes, None)
    names = tk._fused_kernel.arg_names
    types = dict(s_ptr=f"*{dtype}", t_ptr=f"*{dtype}", y_ptr="*i64", w_ptr="*fp32", go_ptr="*fp32",
                 out_ptr="*fp32", part_ptr="*fp32", cnt_ptr="*i32", grad_ptr=f"*{dtype}", gw_ptr="*fp32",
                 R="i32", C="i32", ignore_index="i32")
    types.update({n: "fp32" for n in ("alpha", "beta", "inv_t", "loss_scale", "inv_tp", "tau", "below")})
    consts = dict(BLOCK_R=br, BLOCK_C=bc, MODE=0, HAS_IGNORE=True, HAS_W=False, HAS_PSSM=True,
                  SPACE_PROBS=False, GATE=0, TAU_ON_D=False, ABOVE_D=True, KD_LOGIT_SCALE=False,
                  FWD=True, REDUCE=True, BWD=False, GO_PER_ROW=False, NEED_WGRAD=False)
    consts.update(constexprs)
    sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
    src = ASTSource(tk._fused_kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=nw))
    return kernel, dict(BLOCK_R=br, BLOCK_C=bc, num_warps=nw)


def resource_usage(kernel) -> Dict[str, int]:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    usage["ptx_chars"] = len(kernel.asm["ptx"])
    return usage


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    args = ap.parse_args(argv)
    for dtype in args.dtypes:
        for name, cx in VARIANTS.items():
            k, blocks = compile_variant(dtype, args.arch, args.classes, **cx)
            print(f"sm_{args.arch} C={args.classes} {dtype:>4} {name:<34} {blocks} {resource_usage(k)}")


if __name__ == "__main__":
    main()
