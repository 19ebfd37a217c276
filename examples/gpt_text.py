"""Grow your own GPT: a small character-level transformer in a hand-written loop.

The text is the King James Bible when Debian's ``bible-kjv`` package is installed (its
``bible`` program prints Genesis and Exodus), any UTF-8 file given with ``--text``, or
a short built-in passage otherwise. Slots sit after each of the user's decoder blocks
(outputs ``[N, T, D]``: token sequences); growth decisions read a held-out split.

    python examples/gpt_text.py           # 30 s on a busy 2-core CPU
    python examples/gpt_text.py --tiny    # seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from esper.grow import Grower, GrowerConfig, attach, export_model
from esper.model import LifecycleConfig
from esper.policy import HeuristicConfig, HeuristicController

BUILT_IN = (
    "In the beginning God created the heaven and the earth. And the earth was without "
    "form, and void; and darkness was upon the face of the deep. And the Spirit of God "
    "moved upon the face of the waters. And God said, Let there be light: and there was "
    "light. And God saw the light, that it was good: and God divided the light from the "
    "darkness. And God called the light Day, and the darkness he called Night. "
) * 8


def load_text(path: str | None, max_chars: int) -> tuple[str, str]:
    if path is not None:
        return Path(path).read_text(encoding="utf-8")[:max_chars], path
    if shutil.which("bible"):
        out = subprocess.run(
            ["bible", "-f", "gen1:1-exo40:38"], capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and len(out.stdout) > 10_000:
            return out.stdout[:max_chars], "KJV (bible-kjv: Genesis, Exodus)"
    return BUILT_IN[:max_chars], "built-in passage"


class Block(nn.Module):
    """A pre-norm decoder block: causal self-attention and an MLP, both residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = h.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=h.device), 1)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int = 32, heads: int = 4, layers: int = 2, ctx: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def windows(ids: torch.Tensor, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = (len(ids) - 1) // ctx
    return ids[: n * ctx].view(n, ctx), ids[1 : n * ctx + 1].view(n, ctx)


@torch.no_grad()
def val_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train()
    return loss


def warm_up(args, data) -> None:
    """A few untimed training steps of a throwaway model: torch's one-time start-up
    costs (thread pool, kernel choice, allocator) would otherwise land in the "train s"
    of whichever model the table times first."""
    (tx, ty), (vx, vy), vocab = data
    model = TinyGPT(len(vocab), d=args.d, ctx=args.ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(0, 3 * args.batch, args.batch):
        optimizer.zero_grad()
        loss = F.cross_entropy(
            model(tx[i : i + args.batch]).flatten(0, 1), ty[i : i + args.batch].flatten()
        )
        loss.backward()
        optimizer.step()
    val_loss(model, vx, vy)


def run(args, data, grow: bool) -> dict:
    (tx, ty), (vx, vy), vocab = data
    torch.manual_seed(args.seed)
    model = TinyGPT(len(vocab), d=args.d, ctx=args.ctx)
    net: nn.Module = model
    grower = None
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if grow:
        lifecycle = LifecycleConfig(min_train_epochs=1, blend_epochs=2, embargo_epochs=1)
        net = attach(model, ["blocks.0", "blocks.1"], tx[:2], lifecycle)
        grower = Grower(
            net,
            optimizer,
            [(vx, vy)],
            HeuristicController(HeuristicConfig(plateau_patience=0)),
            GrowerConfig(kind="lm", max_steps=args.epochs, blueprints=("mlp", "attention")),
        )
    order = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(tx), generator=order)[: args.steps * args.batch]
        for i in range(0, len(perm), args.batch):
            idx = perm[i : i + args.batch]
            optimizer.zero_grad()
            loss = F.cross_entropy(net(tx[idx]).flatten(0, 1), ty[idx].flatten())
            loss.backward()
            optimizer.step()
        if grower is not None:
            step = grower.step(train_loss=loss.item())
            print(f"  step {epoch + 1}: {step.action}  (val loss {step.val_loss:.3f})")
    seconds = time.perf_counter() - start
    row = {"model": "grown" if grow else "not grown", "seconds": seconds}
    row["params"] = sum(p.numel() for p in net.parameters())
    row["val_loss"] = val_loss(net, vx, vy)
    if grow:
        row["seeds"] = ", ".join(
            f"{s.slot_id} {s.blueprint} {s.stage.name.lower()}"
            for s in net.slot_states()
            if s.blueprint
        )
        net.eval()
        plain = export_model(net)
        row["params"] = sum(p.numel() for p in plain.parameters())  # no still-training seeds
        with torch.no_grad():
            row["export_diff"] = (plain(vx[:8]) - net(vx[:8])).abs().max().item()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--text", default=None, help="a UTF-8 text file (default: KJV)")
    parser.add_argument("--epochs", type=int, default=8, help="growth steps")
    parser.add_argument("--steps", type=int, default=40, help="batches between growth steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=64)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.steps, args.batch, args.ctx = 4, 3, 8, 32
    text, source = load_text(args.text, 20_000 if args.tiny else 400_000)
    vocab = "".join(sorted(set(text)))
    ids = torch.tensor([vocab.index(c) for c in text])
    split = int(0.9 * len(ids))
    (vx, vy) = windows(ids[split:], args.ctx)
    data = (windows(ids[:split], args.ctx), (vx[:256], vy[:256]), vocab)
    print(f"text: {source}, {len(text)} characters, vocabulary {len(vocab)}")
    warm_up(args, data)  # both models below seed torch themselves: results do not change
    rows = [run(args, data, grow=False), run(args, data, grow=True)]
    print("\n(train s: the training loop's wall time, after an untimed warm-up)")
    print(f"{'model':<10} {'params':>7} {'val loss':>9} {'bits/char':>10} {'train s':>8}  seeds")
    for r in rows:
        print(
            f"{r['model']:<10} {r['params']:>7} {r['val_loss']:>9.4f} "
            f"{r['val_loss'] / math.log(2):>10.3f} {r['seconds']:>8.1f}  {r.get('seeds', '-')}"
        )
    print(f"\nexported plain nn.Module: max |export - grown| = {rows[1]['export_diff']:.2e}")
    return rows


if __name__ == "__main__":
    main()
