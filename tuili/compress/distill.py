"""`tuili distill`: knowledge distillation of a student (e.g. `tuili prune`'s output) from a teacher.

Loss: T^2 * KL(teacher || student) of the next-token distributions at temperature T over every position of
windows of text (the shipped prose by default, a file, or --generate N answers the teacher samples), plus
optionally a weighted MSE between the two models' final (normalised) hidden states when their widths match.
Both models are tuili's own classes in torch (the teacher without gradients) on the same device: fp32 on the
CPU; on a GPU the teacher runs in bf16 and the student keeps fp32 weights with bf16 autocast. AdamW, linear
warm-up then cosine decay to 10%, gradient accumulation. The last 5% of the windows are held out: validation
KL, the student's perplexity and its top-1 agreement with the teacher, before training, at every checkpoint and
at the end. Checkpoints (`checkpoint.pt` in --out) every --checkpoint-every steps and at the end; `--resume`
continues from one on the same loss curve (the data order is a function of the seed and the step). Writes the
student as a HF folder, `distill.json` and `loss.png`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from tuili.compress.common import (forward, load_float_model, resolve_device, save_hf_folder, text_token_ids,
                                   windows_of)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) per token, averaged: logits [N, V]."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_for(step: int, windows: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """Step `step`'s batch: epochs of a seeded permutation of the training windows (resumable by step)."""
    n = windows.shape[0]
    first = step * batch_size
    rows = []
    for i in range(first, first + batch_size):
        epoch, at = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        rows.append(perm[at].item())
    return windows[rows]


class Distiller:
    def __init__(self, ns: argparse.Namespace, device: torch.device) -> None:
        self.ns, self.device = ns, device
        gpu = device.type == "cuda"
        # the teacher writes its text first, alone on the device (a resumed run reads it from the checkpoint)
        ids = teacher_text(ns) if ns.generate and not ns.resume else None
        self.teacher, tsrc = load_float_model(ns.teacher, device, torch.bfloat16 if gpu else torch.float32,
                                              ns.load_format, ns.tokenizer)
        self.student, ssrc = load_float_model(ns.student, device, torch.float32)
        if tsrc.config.vocab_size != ssrc.config.vocab_size:
            raise ValueError(f"the student's vocabulary ({ssrc.config.vocab_size}) is not the teacher's "
                             f"({tsrc.config.vocab_size}): distillation compares their next-token distributions")
        self.source = ssrc
        longest = min(tsrc.config.max_position_embeddings, ssrc.config.max_position_embeddings)
        if ns.seq_len > longest:
            raise ValueError(f"--seq-len {ns.seq_len} exceeds the models' max_position_embeddings ({longest})")
        tokenizer = tsrc.tokenizer or ssrc.tokenizer
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
        for p in self.student.parameters():
            p.requires_grad_(True)
        self.hidden_loss = ns.hidden_loss_weight > 0
        if self.hidden_loss and tsrc.config.hidden_size != ssrc.config.hidden_size:
            raise ValueError("--hidden-loss-weight needs the student's hidden size to be the teacher's "
                             f"({ssrc.config.hidden_size} vs {tsrc.config.hidden_size})")
        self._set_text(ids if ids is not None else text_token_ids(tokenizer, ns.text))
        self.opt = torch.optim.AdamW([p for p in self.student.parameters()], lr=ns.lr, weight_decay=0.01,
                                     betas=(0.9, 0.95))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, ns.warmup, ns.steps))
        self.step, self.history, self.evals = 0, [], []

    def _set_text(self, ids: list[int]) -> None:
        """Training windows and the held-out last 5% of them."""
        self.ids = ids
        windows = windows_of(ids, self.ns.seq_len, self.device)
        held = max(1, windows.shape[0] // 20)
        if windows.shape[0] - held < 1:
            raise ValueError(f"the text gives {windows.shape[0]} windows of {self.ns.seq_len} tokens: too few to "
                             "train")
        self.train, self.val = windows[:-held], windows[-held:]

    def _losses(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self.autocast:
            t_hidden = forward(self.teacher, batch)
            t_logits = self.teacher.compute_logits(t_hidden).flatten(0, 1)
        with self.autocast:
            s_hidden = forward(self.student, batch)
            s_logits = self.student.compute_logits(s_hidden).flatten(0, 1)
        kl = kd_loss(s_logits, t_logits, self.ns.temperature)
        loss = kl
        if self.hidden_loss:
            loss = loss + self.ns.hidden_loss_weight * F.mse_loss(s_hidden.float(), t_hidden.float())
        return loss, kl

    @torch.no_grad()
    def evaluate(self) -> dict:
        kl_sum = nll = agree = count = 0.0
        for start in range(0, self.val.shape[0], self.ns.batch_size):
            batch = self.val[start:start + self.ns.batch_size]
            with self.autocast:
                t = self.teacher.compute_logits(forward(self.teacher, batch)).float()
                s = self.student.compute_logits(forward(self.student, batch)).float()
            n = batch.numel()
            kl_sum += kd_loss(s.flatten(0, 1), t.flatten(0, 1), 1.0).item() * n
            nll += F.cross_entropy(s[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
            count += n
        tokens = self.val.numel() - self.val.shape[0]
        return {"step": self.step, "val_kl": kl_sum / count, "val_ppl": math.exp(nll / tokens),
                "top1_agreement": agree / count}

    def save_checkpoint(self) -> None:
        os.makedirs(self.ns.out, exist_ok=True)
        path = os.path.join(self.ns.out, "checkpoint.pt")
        torch.save({"step": self.step, "student": self.student.state_dict(), "opt": self.opt.state_dict(),
                    "sched": self.sched.state_dict(), "history": self.history, "evals": self.evals,
                    "args": vars(self.ns), "ids": self.ids}, path + ".tmp")
        os.replace(path + ".tmp", path)  # a run cut off while saving keeps the previous checkpoint

    def resume(self) -> None:
        path = os.path.join(self.ns.out, "checkpoint.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        changed = [k for k in RESUME_KEYS if ckpt["args"].get(k) != getattr(self.ns, k)]
        if changed:
            raise ValueError(f"--resume with other settings than the checkpoint's: {', '.join(changed)} (the data "
                             "order and schedule depend on them); run with the same ones")
        self._set_text(ckpt["ids"])
        self.student.load_state_dict(ckpt["student"])
        self.opt.load_state_dict(ckpt["opt"])
        self.sched.load_state_dict(ckpt["sched"])
        self.step, self.history, self.evals = ckpt["step"], ckpt["history"], ckpt["evals"]

    def run(self, show_progress: bool = True, stop_at: int | None = None) -> dict:
        """Train to --steps (or only to `stop_at`: an interrupted run, in tests), then evaluate and checkpoint."""
        from tqdm import tqdm

        ns = self.ns
        last = min(ns.steps, stop_at or ns.steps)
        if not self.evals:
            self.evals.append(self.evaluate())
        bar = tqdm(total=ns.steps, initial=self.step, desc="distill", disable=not show_progress)
        start, tokens = time.perf_counter(), 0
        while self.step < last:
            self.opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(ns.grad_accum):
                batch = batch_for(self.step * ns.grad_accum + micro, self.train, ns.batch_size, ns.seed)
                loss, kl = self._losses(batch)
                (loss / ns.grad_accum).backward()
                total += kl.item() / ns.grad_accum
                tokens += batch.numel()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.step += 1
            self.history.append(total)
            rate = tokens / (time.perf_counter() - start)
            bar.set_postfix(kl=f"{total:.3f}", lr=f"{self.sched.get_last_lr()[0]:.1e}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if ns.checkpoint_every and self.step % ns.checkpoint_every == 0 and self.step < ns.steps:
                self.evals.append(self.evaluate())  # the validation curve
                self.save_checkpoint()
        bar.close()
        seconds = time.perf_counter() - start
        if self.evals[-1]["step"] != self.step:
            self.evals.append(self.evaluate())
        self.save_checkpoint()
        return {"steps": self.step, "train_tokens_per_s": tokens / seconds if seconds > 0 else None,
                "seconds_this_run": seconds, "evals": self.evals, "train_kl": self.history}

    def export(self, report: dict) -> None:
        state = {k: v.detach() for k, v in self.student.hf_state_dict().items()}
        save_hf_folder(state, self.source.config, self.source.tokenizer, self.ns.out)
        if self.device.type == "cuda":
            report["peak_memory_GiB"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        with open(os.path.join(self.ns.out, "distill.json"), "w") as f:
            json.dump(report, f, indent=2)
        plot_losses(report, os.path.join(self.ns.out, "loss.png"))


RESUME_KEYS = ("teacher", "student", "load_format", "text", "generate", "steps", "batch_size", "seq_len",
               "grad_accum", "lr", "warmup", "temperature", "hidden_loss_weight", "seed")


def teacher_text(ns: argparse.Namespace) -> list[int]:
    """Training tokens written by the teacher: --generate answers (sampled at temperature 0.8, up to 256 tokens)
    to the fixed prompt set of tuili/bench/quality.py, cycled, each with its prompt (chat template). The engine
    is freed before training starts; seed 0, as load_float_model's random weights (--load-format dummy) use.
    The held-out windows come from the last answers, to prompts that earlier answers share."""
    import gc

    from tuili import LLM, SamplingParams
    from tuili.bench.quality import PROMPTS, prompt_ids

    llm = LLM(ns.teacher, load_format=ns.load_format, tokenizer=ns.tokenizer, device=ns.device, seed=0)
    prompts = prompt_ids(llm, [PROMPTS[i % len(PROMPTS)] for i in range(ns.generate)])
    outs = llm.generate(prompts, SamplingParams(temperature=0.8, max_tokens=256))
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [t for p, o in zip(prompts, outs) for t in p + o.outputs[0].token_ids]


def plot_losses(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(report["train_kl"]) + 1), report["train_kl"], lw=0.8, label="train KL (per step)")
    evals = report["evals"]
    ax.plot([e["step"] for e in evals], [e["val_kl"] for e in evals], "o-", label="validation KL")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student)")
    ax.set_yscale("log")
    ax.set_title(f"distillation: top-1 agreement {evals[0]['top1_agreement']:.1%} -> {evals[-1]['top1_agreement']:.1%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_distill(ns: argparse.Namespace) -> int:
    for name in ("steps", "batch_size", "seq_len", "grad_accum"):
        if getattr(ns, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
    if ns.temperature <= 0 or ns.lr <= 0:
        raise ValueError("--temperature and --lr must be > 0")
    torch.manual_seed(ns.seed)
    device = resolve_device(ns.device)
    d = Distiller(ns, device)
    if ns.resume:
        d.resume()
    report = d.run()
    d.export(report)
    first, last = report["evals"][0], report["evals"][-1]
    print(f"distilled {d.step} steps ({report['train_tokens_per_s'] or 0:.0f} tok/s): validation KL "
          f"{first['val_kl']:.3f} -> {last['val_kl']:.3f}, perplexity {first['val_ppl']:.2f} -> {last['val_ppl']:.2f}, "
          f"top-1 agreement {first['top1_agreement']:.1%} -> {last['top1_agreement']:.1%}; wrote {ns.out}")
    return 0


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default=None, help="HF folder or .gguf (default: the default model)")
    parser.add_argument("--student", required=True, help="HF folder (e.g. from tuili prune)")
    parser.add_argument("--out", required=True, help="output folder: the distilled student, checkpoint, plots")
    parser.add_argument("--load-format", default="auto", help="of the teacher; dummy: random weights of a named "
                                                               "shape (speed tests)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for the teacher (default: its own)")
    parser.add_argument("--text", default=None, help="training text (default: the shipped prose)")
    parser.add_argument("--generate", type=int, default=0, help="train instead on N answers the teacher writes "
                                                                "to fixed prompts")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--hidden-loss-weight", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
