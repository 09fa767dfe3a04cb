"""The LM's loss and gradients with srl's attention kernels against SDPA on the same weights and
batch (CUDA): relative errors in float32 and under bf16 autocast, with SDPA's own float32-vs-bf16
gap as the yardstick. Run on the GPU: ``python benchmarks/lm_kernel_check.py --out check.json``."""
from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import torch
import torch.nn.functional as F

from srl.envs.text import AdditionTask
from srl.policies.lm import LMConfig, TransformerLM

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def loss_and_grads(model: TransformerLM, ids: torch.Tensor, mask: torch.Tensor, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEV, torch.bfloat16, enabled=bf16):
        logits = model(ids[:, :-1])
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none")
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten().float() for p in model.parameters()])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="lm_kernel_check.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    task = AdditionTask(n_digits=3)
    cfg = LMConfig(vocab_size=len(task.vocab), d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                   max_seq_len=64)
    ids = torch.as_tensor(task.stream(args.batch, 65, np.random.default_rng(0)), device=DEV)
    mask = task.answer_targets(ids).reshape(-1).float()
    ours = TransformerLM(cfg).to(DEV)
    ref = copy.deepcopy(ours)
    for block in ref.blocks:
        block.kernels = False
    out = {}
    for bf16 in (False, True):
        la, ga = loss_and_grads(ours, ids, mask, bf16)
        lb, gb = loss_and_grads(ref, ids, mask, bf16)
        out["bf16" if bf16 else "fp32"] = {"loss_kernels": la, "loss_sdpa": lb,
                                           "grad_rel_err": float((ga - gb).norm() / gb.norm())}
    _, g32 = loss_and_grads(ref, ids, mask, False)
    _, g16 = loss_and_grads(ref, ids, mask, True)
    out["sdpa_bf16_vs_fp32_grad_rel"] = float((g16 - g32).norm() / g32.norm())
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
