"""Child process: LoRA training throughput of transformers + peft on torch CPU (the baseline for (1)/(3)).

Reads token ids prepared by the parent (the same ids FineTune trains on), builds batches the way
finetune.train.batches does (length buckets, a seeded permutation per epoch, right padding to 1 + a multiple of
32), trains with the same masked cross-entropy and Adam, and prints one JSON line with step timestamps,
the loop's start and the process's peak RSS.
No attention mask is passed: with right padding a causal model's real tokens never see the pads, as in MLX.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

PAD_TO = 32  # finetune.data.tokens.batch_width, copied: this torch-only child imports nothing of finetune
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def batches(lengths: list[int], batch_size: int, seed: int):
    """Example indices per step: the same bucketing and order as finetune.train.batches.batch_at."""
    import numpy as np

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    epoch = 0
    while True:
        for pos in np.random.default_rng([seed, epoch]).permutation(len(buckets)):
            yield buckets[pos]
        epoch += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--examples", required=True, help="JSON: {'ids': [[...]], 'masks': [[...]]}")
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--num-layers", type=int, default=-1)
    p.add_argument("--keys", default="", help="comma-separated module names (default: every block linear)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)

    t_start = time.time()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    with open(a.examples, encoding="utf-8") as fh:
        data = json.load(fh)
    ids, masks = data["ids"], data["masks"]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    adapted = n_layers if a.num_layers == -1 else min(a.num_layers, n_layers)
    keys = [k.split(".")[-1] for k in a.keys.split(",") if k] or list(BLOCK_LINEARS)
    top_blocks = list(range(n_layers - adapted, n_layers))
    cfg = LoraConfig(
        r=a.rank,
        lora_alpha=a.scale * a.rank,
        lora_dropout=a.dropout,
        target_modules=keys,
        layers_to_transform=top_blocks,
        bias="none",
    )
    model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=a.lr)
    model.train()
    loaded = time.time()

    times, losses, shapes, tokens, loss_tokens = [], [], [], [], []
    order = batches([len(x) for x in ids], a.batch_size, a.seed)
    for _ in range(a.iters):
        rows = next(order)
        longest = max(len(ids[i]) for i in rows)
        width = min(1 + PAD_TO * ((longest + PAD_TO - 1) // PAD_TO), a.max_seq_length)
        batch = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.float32)
        for j, i in enumerate(rows):
            n = min(len(ids[i]), width)
            batch[j, :n] = torch.tensor(ids[i][:n])
            mask[j, :n] = torch.tensor(masks[i][:n], dtype=torch.float32)
        logits = model(input_ids=batch[:, :-1]).logits
        weights = mask[:, 1:].reshape(-1)
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        loss = (ce * weights).sum() / weights.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.time())
        shapes.append(list(batch.shape))
        tokens.append(int(sum(min(len(ids[i]), width) for i in rows)))
        loss_tokens.append(int(weights.sum().item()))
    result = {
        "times": times,
        "losses": losses,
        "shapes": shapes,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "trainable_params": trainable,
        "startup_s": loaded - t_start,
        "loop_start": loaded,
        "loss_tokens": loss_tokens,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
