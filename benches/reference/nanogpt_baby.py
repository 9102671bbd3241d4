"""PyTorch reference for aigc's GPT target: nanoGPT's CPU "baby" config on character-level
tiny Shakespeare (n_layer 4, n_head 4, n_embd 128, block 64, batch 12, dropout 0, no biases,
AdamW lr 1e-3 betas (0.9, 0.99) wd 0.1, warmup 100 then cosine to 1e-4 at 2000 iters, clip 1).

Usage: python3 benches/reference/nanogpt_baby.py PATH/TO/input.txt [iters] [--compile] [--seed N]
Prints iterations/s, tokens/s, and the validation loss at the end twice: nanoGPT's estimate
(the mean over random validation batches) and the loss over the whole validation text, scored
as aigc's `gpt::validation_loss` does (windows every block/2 characters, each target scored once,
from the first window that holds it). Run with the same thread
count as aigc (torch.set_num_threads(2)). Not part of the test suite.
"""

import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(2)
args = [a for a in sys.argv[1:]]
seed = 1337
if "--seed" in args:
    at = args.index("--seed")
    seed = int(args[at + 1])
    del args[at : at + 2]
compile_model = "--compile" in args
args = [a for a in args if a != "--compile"]
torch.manual_seed(seed)
path = args[0]
iters = int(args[1]) if len(args) > 1 else 2000
text = open(path, encoding="utf-8").read()
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
n = int(0.9 * len(data))
train, val = data[:n], data[n:]
V, BLOCK, L, H, C, B = len(chars), 64, 4, 4, 128, 12


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(b, t, H, c // H).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
        self.attn = Attn()
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C, bias=False), nn.GELU(), nn.Linear(4 * C, C, bias=False))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Gpt(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(BLOCK, C)
        self.h = nn.ModuleList([Block() for _ in range(L)])
        self.ln_f = nn.LayerNorm(C, bias=False)
        self.lm_head = nn.Linear(C, V, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * L) if name.endswith("2.weight") or "c_proj" in name else 0.02)

    def forward(self, idx, targets, reduction="mean"):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.h:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=-1, reduction=reduction)


def batch(split):
    d = train if split == "train" else val
    ix = torch.randint(len(d) - BLOCK, (B,))
    return torch.stack([d[i : i + BLOCK] for i in ix]), torch.stack([d[i + 1 : i + 1 + BLOCK] for i in ix])


def lr_at(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


model = Gpt()
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
step = torch.compile(model) if compile_model else model
t0 = time.time()
for it in range(iters):
    for g in opt.param_groups:
        g["lr"] = lr_at(it)
    x, y = batch("train")
    loss = step(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if it == 9:
        t_warm = time.time()
    if it % 200 == 0:
        print(f"iter {it} loss {loss.item():.4f} {time.time() - t0:.1f}s", flush=True)
elapsed = time.time() - t_warm
print(f"{(iters - 10) / elapsed:.2f} it/s, {(iters - 10) * B * BLOCK / elapsed:.0f} tokens/s (after 10 warm-up iters)")
model.eval()
with torch.no_grad():
    losses = [model(*batch("val")).item() for _ in range(200)]
    # The whole validation text: windows every BLOCK/2, each target scored once, by the
    # first window that holds it (aigc's gpt::validation_loss).
    last = len(val) - 1 - BLOCK
    starts = list(range(0, last + 1, BLOCK // 2))
    if starts[-1] != last:
        starts.append(last)
    xs, ys, scored_until = [], [], 0
    for s in starts:
        xs.append(val[s : s + BLOCK])
        y = val[s + 1 : s + 1 + BLOCK].clone()
        y[: max(0, scored_until - s)] = -1
        ys.append(y)
        scored_until = s + BLOCK
    total = sum(model(torch.stack(xs[i : i + 64]), torch.stack(ys[i : i + 64]), "sum").item() for i in range(0, len(xs), 64))
    whole = total / (len(val) - 1)
print(f"val loss {sum(losses) / len(losses):.4f} (200 random batches), whole validation text {whole:.4f}, after {iters} iters (seed {seed}), {time.time() - t0:.1f}s total")
