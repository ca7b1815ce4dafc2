"""Accuracy and loss of named outputs on a split: top-1/top-5 and mean cross-entropy, one host sync per evaluation."""
import torch
import torch.nn.functional as F

import dataload
from dihkit.runs.run_context import RunContext


@torch.no_grad()
def evaluate_outputs(fn, split: dataload.Split, ctx: RunContext) -> dict:
    """Top-1/top-5 (percent) and mean cross-entropy ``loss`` of every named output of ``fn`` on ``split``; one
    host sync in all."""
    counts = None
    total = torch.zeros((), device=ctx.device)
    k = min(5, ctx.info.num_classes)
    for x, y, _ in dataload.eval_batches(split, ctx.info, max(256, ctx.cfg.data.batch_size), ctx.device,
                                         ctx.dist.rank, ctx.dist.world_size, **ctx.cfg.data.loader_options()):
        with ctx.eval_autocast():
            outs = fn(x)
        if counts is None:
            counts = {name: torch.zeros(3, device=ctx.device) for name in outs}
        for name, logits in outs.items():
            hit = logits.topk(k, dim=1).indices.eq(y[:, None])
            counts[name][0] += hit[:, 0].sum()
            counts[name][1] += hit.any(dim=1).sum()
            counts[name][2] += F.cross_entropy(logits.float(), y, reduction="sum")
        total += y.numel()
    stacked = torch.stack([total.expand(3)] + list(counts.values()))
    ctx.dist.all_reduce_sum(stacked)
    stacked = stacked.cpu()
    n = stacked[0, 0].item()
    return {name: {"top1": 100.0 * row[0].item() / n, "top5": 100.0 * row[1].item() / n, "loss": row[2].item() / n}
            for name, row in zip(counts, stacked[1:])}


def headline(metrics: dict) -> float:
    """The number a split's metrics are ranked by: mean top-1 over the outputs."""
    return sum(m["top1"] for m in metrics.values()) / len(metrics)
