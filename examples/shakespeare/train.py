"""Train a character-level language model on Tiny Shakespeare with fastrnn's recurrent layers.

    python examples/shakespeare/train.py --data input.txt --out examples/shakespeare/runs/lstm --time-budget 400
    python examples/shakespeare/train.py --out examples/shakespeare/runs/lstm --resume --time-budget 800
    torchrun --nproc-per-node 2 examples/shakespeare/train.py --data input.txt --steps 1000

See README.md next to this file for what the options do and what to expect.
"""

import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import charlm  # noqa: E402
from charlm import fastrnn  # noqa: E402

DEFAULTS = dict(
    data=None, out=str(Path(__file__).resolve().parent / "runs" / "latest"), preset="reference",
    cell="lstm", nonlinearity="tanh", hidden=512, layers=1, emb=64, batch=64, seq=128, lr=2e-3,
    dropout=0.0, layer_norm=False, zoneout=0.0, recurrent_dropout=0.0, clip=1.0, decay="none", steps=None,
    time_budget=None, backend="auto", torch=False,
    carry_state=False, eval_every=200, eval_batches=8, save_every=None, seed=1234, threads=None, resume=None,
)
# The model of TensorFlow's text-generation tutorial (tensorflow.org/text/tutorials/text_generation):
# embedding 256, one GRU of 1024 units, batch 64, sequences of 100, Adam at 1e-3 and no clipping; it trains
# 10 epochs of 172 steps, so the preset runs the same 1720 optimizer steps.
PRESETS: Dict[str, Dict] = {
    "reference": {},
    "seed": dict(cell="gru", hidden=1024, emb=256, batch=64, seq=100, lr=1e-3, clip=0.0, dropout=0.0, steps=1720),
}
# What a resumed run may change; everything else defines the run and is taken from the checkpoint.
RUN_CONTROL = {"data", "out", "steps", "time_budget", "eval_every", "eval_batches", "save_every", "backend",
               "torch", "threads", "resume"}
CHECKPOINT = "ckpt.pt"


def parser() -> argparse.ArgumentParser:
    shown = {k: v for k, v in DEFAULTS.items() if v is not None and k != "out"}
    epilog = ("defaults: " + ", ".join(f"{k}={v}" for k, v in shown.items())
              + "; without --steps or --time-budget, --steps 2000")
    p = argparse.ArgumentParser(description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="local copy of the corpus (default: download and cache it)")
    p.add_argument("--out", help="directory for checkpoint, log, loss plot and summary.json")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration; other options override it")
    p.add_argument("--cell", choices=["lstm", "gru", "rnn"])
    p.add_argument("--nonlinearity", choices=["tanh", "relu"], help="for --cell rnn")
    p.add_argument("--hidden", type=int, help="hidden units per layer")
    p.add_argument("--layers", type=int)
    p.add_argument("--emb", type=int, help="embedding size")
    p.add_argument("--batch", type=int, help="sequences per step and process")
    p.add_argument("--seq", type=int, help="characters per sequence (the BPTT length)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--dropout", type=float, help="on the RNN output (and between layers)")
    p.add_argument("--layer-norm", action="store_true", default=None,
                   help="LayerNorm cells (fastrnn's layer_norm=True; see the module docstrings)")
    p.add_argument("--zoneout", type=float, help="zoneout probability of h (and c) per step")
    p.add_argument("--recurrent-dropout", type=float, help="dropout on h where it enters W_hh, one mask a sequence")
    p.add_argument("--clip", type=float, help="gradient-norm clipping threshold; 0 turns it off")
    p.add_argument("--decay", choices=["none", "cosine"],
                   help="cosine: lower the learning rate to a tenth of --lr over --steps (or --time-budget)")
    p.add_argument("--steps", type=int, help="stop after this many optimizer steps in all")
    p.add_argument("--time-budget", type=float, help="stop after this many seconds of training in all "
                   "(periodic evaluation and checkpoint writes not counted)")
    p.add_argument("--backend", choices=["auto", *fastrnn.BACKENDS], help="fastrnn backend")
    p.add_argument("--torch", action="store_true", default=None, help="use torch.nn's RNN modules instead (A/B)")
    p.add_argument("--carry-state", action="store_true", default=None,
                   help="truncated BPTT: carry the hidden state from each chunk into the next")
    p.add_argument("--eval-every", type=int, help="validate every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, help="batches of validation text per periodic evaluation")
    p.add_argument("--save-every", type=int,
                   help="checkpoint every N steps (default: --eval-every; 0: only at the end)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help=f"continue from CKPT (default: OUT/{CHECKPOINT})")
    return p


def resolve_args(argv: Optional[List[str]] = None) -> Dict:
    """Defaults, then the preset, then a resumed checkpoint's settings, then what the command line gives."""
    given = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None}
    args = dict(DEFAULTS)
    preset = given.get("preset", DEFAULTS["preset"])
    args.update(PRESETS[preset])
    ckpt = None
    if "resume" in given:
        out = given.get("out", args["out"])
        path = given["resume"] or str(Path(out) / CHECKPOINT)
        ckpt = charlm.load_checkpoint(path)
        args.update(ckpt["args"])
        clash = {k: (ckpt["args"][k], v) for k, v in given.items()
                 if k not in RUN_CONTROL and k != "preset" and ckpt["args"].get(k) != v}
        if clash:
            raise SystemExit(f"--resume: these differ from the checkpoint's run: {clash} (checkpoint, given)")
        args["resume"] = path
    args.update(given)
    args["preset"] = preset if ckpt is None else ckpt["args"]["preset"]
    if args["steps"] is None and args["time_budget"] is None:
        args["steps"] = 2000
    if args["save_every"] is None:
        args["save_every"] = args["eval_every"]
    return {"args": args, "checkpoint": ckpt}


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM, e.g. from torchrun, asks the loop to stop at the next step boundary and
    checkpoint; a second signal stops at once without one."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to whoever owns them
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Run:
    """One training process: rank ``rank`` of ``world`` (1 without torchrun)."""

    def __init__(self, args: Dict, ckpt: Optional[Dict]) -> None:
        self.args = args
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
        self.is_main = self.rank == 0
        if args["threads"]:
            torch.set_num_threads(args["threads"])
        text = charlm.load_text(args["data"])
        self.out = Path(args["out"])
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.vocab = charlm.Vocab.from_text(text)
        self.corpus_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if ckpt is not None and ckpt["corpus_sha256"] != self.corpus_sha256:
            raise SystemExit("--resume: --data is not the text the checkpoint was trained on")
        train_ids, val_ids = charlm.split(self.vocab.encode(text))
        self.val_windows, self.val_mask = charlm.eval_windows(val_ids, args["seq"])

        torch.manual_seed(args["seed"])
        self.model = charlm.model_from_args(len(self.vocab), args)
        # dropout masks differ between ranks; rank 0 keeps the single-process stream
        torch.manual_seed(args["seed"] + self.rank)
        np.random.seed(args["seed"] + self.rank)
        random.seed(args["seed"] + self.rank)
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args["lr"])
        self.batches = charlm.Batches(train_ids, args["batch"], args["seq"], args["seed"], self.rank, self.world,
                                      contiguous=args["carry_state"])
        self.step = 0
        self.losses: List[float] = []
        self.val_history: List[List[float]] = []
        self.train_seconds = 0.0
        self.hidden = None
        if ckpt is not None:
            self._restore(ckpt)

    def _restore(self, ckpt: Dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.batches.load_state_dict(ckpt["loader"])
        self.step = ckpt["step"]
        self.losses = list(ckpt["losses"])
        self.val_history = [list(v) for v in ckpt["val_history"]]
        self.train_seconds = ckpt["train_seconds"]
        per_rank = ckpt["rank_states"]
        if len(per_rank) == self.world:
            charlm.set_rng_state(per_rank[self.rank]["rng"])
            self.hidden = per_rank[self.rank]["hidden"]
        else:
            self.log(f"resuming on {self.world} process(es) from a {len(per_rank)}-process checkpoint: "
                     "fresh RNG streams and hidden states, so not bit-for-bit")

    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        tqdm.write(msg)
        with open(self.out / "train.log", "a") as f:
            f.write(msg + "\n")

    def checkpoint(self) -> Dict:
        mine = {"rng": charlm.rng_state(), "hidden": self.hidden}
        per_rank = [mine]
        if self.world > 1:
            per_rank = [None] * self.world
            dist.all_gather_object(per_rank, mine)
        return {
            "format": 1,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "loader": self.batches.state_dict(),
            "rank_states": per_rank,
            "vocab": self.vocab.chars,
            "corpus_sha256": self.corpus_sha256,
            "args": dict(self.args),
            "losses": list(self.losses),
            "val_history": [list(v) for v in self.val_history],
            "train_seconds": self.train_seconds,
        }

    def save(self) -> None:
        state = self.checkpoint()  # collective under DDP: every rank takes part, rank 0 writes
        if self.is_main:
            charlm.save_atomic(state, self.out / CHECKPOINT)

    def validate(self, limit: Optional[int]) -> float:
        total, count = charlm.evaluate(self.model, self.val_windows, self.val_mask, self.args["batch"],
                                       self.rank, self.world, limit)
        if self.world > 1:
            sums = torch.tensor([total, count], dtype=torch.float64)
            dist.all_reduce(sums)
            total, count = float(sums[0]), int(sums[1])
        self.val_chars = count
        return total / count

    def plot(self) -> None:
        if not self.is_main or not self.losses:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps = np.arange(1, len(self.losses) + 1)
        ax.plot(steps, self.losses, color="tab:blue", alpha=0.25, lw=0.8)
        width = max(1, min(50, len(self.losses) // 10))
        smooth = np.convolve(self.losses, np.ones(width) / width, mode="valid")
        ax.plot(steps[width - 1:], smooth, color="tab:blue", label=f"train (mean of {width} steps)")
        if self.val_history:
            v = np.array(self.val_history)
            ax.plot(v[:, 0], v[:, 1], "o-", color="tab:orange", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/char)")
        ax.set_title(self.describe())
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.out / "loss.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, self.out / "loss.png")

    def backend_name(self) -> str:
        if self.args["torch"]:
            return "torch.nn"
        p = next(self.model.parameters())
        features = tuple(f for f in ("layer_norm", "zoneout", "recurrent_dropout") if self.args[f])
        return self.model.rnn._backend_for(p, features)[0].__name__.rsplit(".", 1)[-1]

    def describe(self) -> str:
        a = self.args
        cell = a["cell"].upper() if a["cell"] != "rnn" else f"RNN({a['nonlinearity']})"
        ext = "".join(f", {name} {a[key]:g}" for name, key in (("zoneout", "zoneout"),
                      ("recurrent dropout", "recurrent_dropout")) if a[key])
        return (f"{cell}{' LayerNorm' if a['layer_norm'] else ''} {a['layers']}x{a['hidden']}, emb {a['emb']}, "
                f"batch {a['batch']}x{self.world}, seq {a['seq']}, lr {a['lr']:g}{ext} [{self.backend_name()}]")

    def _stop_reason(self) -> Optional[str]:
        a = self.args
        if a["steps"] is not None and self.step >= a["steps"]:
            return "steps"
        if a["time_budget"] is not None and self.train_seconds >= a["time_budget"]:
            return "time budget"
        return None

    def lr(self) -> float:
        a = self.args
        if a["decay"] == "none":
            return a["lr"]
        # under --time-budget the schedule follows the clock, so such runs do not repeat bit-for-bit
        progress = max(self.step / a["steps"] if a["steps"] else 0.0,
                       self.train_seconds / a["time_budget"] if a["time_budget"] else 0.0)
        return a["lr"] * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def train_step(self) -> float:
        a = self.args
        for group in self.opt.param_groups:
            group["lr"] = self.lr()
        if not a["carry_state"] or self.batches.new_epoch:
            self.hidden = None
        x, y = self.batches.next()
        logits, hidden = self.net(x, self.hidden)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if a["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), a["clip"])
        self.opt.step()
        if a["carry_state"]:
            self.hidden = charlm.detach_state(hidden)
        self.step += 1
        return loss.item()

    def agree(self, loss: float, stop: bool):
        """The mean loss over ranks, and whether any rank wants to stop.

        Each rank has its own clock and receives its own signals; averaging the training time as well keeps
        the time budget and a clock-driven learning rate the same on every rank.
        """
        if self.world == 1:
            return loss, stop
        t = torch.tensor([loss, float(stop), self.train_seconds], dtype=torch.float64)
        dist.all_reduce(t)
        self.train_seconds = float(t[2]) / self.world
        return float(t[0]) / self.world, bool(t[1] > 0)

    def fit(self) -> Dict:
        a = self.args
        tokens_per_step = a["batch"] * a["seq"] * self.world
        self.log(f"{self.describe()}; {sum(p.numel() for p in self.model.parameters()):,} parameters; "
                 f"{self.batches.steps_per_epoch()} steps per epoch"
                 + (f"; resumed at step {self.step}" if self.step else ""))
        start_step, start_seconds, wall0 = self.step, self.train_seconds, time.perf_counter()
        bar = tqdm(total=a["steps"], initial=self.step, unit="step", disable=not self.is_main,
                   dynamic_ncols=True, mininterval=1.0)
        interrupted = False
        with StopFlag() as flag:
            reason = self._stop_reason()
            while reason is None:
                t0 = time.perf_counter()
                loss = self.train_step()
                self.train_seconds += time.perf_counter() - t0
                loss, stop = self.agree(loss, flag.raised or self._stop_reason() is not None)
                self.losses.append(loss)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss} at step {self.step}")
                done = self.step - start_step
                rate = done * tokens_per_step / max(self.train_seconds - start_seconds, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
                if a["eval_every"] and self.step % a["eval_every"] == 0:
                    val = self.validate(a["eval_batches"])
                    self.val_history.append([self.step, val, self.train_seconds])
                    self.log(f"step {self.step}: train {loss:.4f}, val {val:.4f} ({self.val_chars:,} chars), "
                             f"{rate:,.0f} tokens/s, {self.train_seconds:.0f} s")
                    self.plot()
                if a["save_every"] and self.step % a["save_every"] == 0 and not stop:
                    self.save()
                if stop:
                    reason = "interrupted" if flag.raised else self._stop_reason()
                    interrupted = flag.raised
        bar.close()
        self.save()
        if interrupted:
            self.log(f"interrupted at step {self.step}; checkpoint {self.out / CHECKPOINT}; continue with --resume")
            return {"interrupted": True, "step": self.step}
        return self.finish(reason, start_step, start_seconds, wall0)

    def finish(self, reason: str, start_step: int, start_seconds: float, wall0: float) -> Dict:
        a = self.args
        val = self.validate(None)
        self.val_history.append([self.step, val, self.train_seconds])
        self.plot()
        tokens_per_step = a["batch"] * a["seq"] * self.world
        per_epoch = self.batches.steps_per_epoch()
        summary = {
            "config": self.describe(),
            "stopped_by": reason,
            "steps": self.step,
            "epochs": round(self.step / per_epoch, 3),
            "tokens": self.step * tokens_per_step,
            "train_seconds": round(self.train_seconds, 2),
            "tokens_per_s": round(self.step * tokens_per_step / max(self.train_seconds, 1e-9), 1),
            "tokens_per_s_this_session": round((self.step - start_step) * tokens_per_step
                                               / max(self.train_seconds - start_seconds, 1e-9), 1),
            "wall_seconds_this_session": round(time.perf_counter() - wall0, 2),
            "val_loss": round(val, 5),
            "val_chars": self.val_chars,
            "val_note": "mean cross-entropy in nats/char over the whole validation split (last 10% of the text), "
                        f"in windows of {a['seq']} characters each starting from a zero state",
            "train_loss_last_epoch": round(float(np.mean(self.losses[-per_epoch:])), 5),
            "val_history": [[int(s), round(v, 5), round(t, 2)] for s, v, t in self.val_history],
            "val_history_note": "[step, val loss, training seconds]; periodic entries use the first "
                                f"{a['eval_batches']} batches of validation windows, the last entry all of them",
            "backend": self.backend_name(),
            "world_size": self.world,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "args": a,
        }
        self.log(f"final: {self.step} steps, {self.train_seconds:.1f} s training, "
                 f"{summary['tokens_per_s']:,.0f} tokens/s, val loss {val:.4f} nats/char "
                 f"(full validation split, {self.val_chars:,} chars), train loss (last epoch) "
                 f"{summary['train_loss_last_epoch']:.4f}, stopped by {reason}")
        if self.is_main:
            tmp = self.out / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, self.out / "summary.json")
        return summary


def main(argv: Optional[List[str]] = None) -> Dict:
    resolved = resolve_args(argv)
    try:
        return Run(resolved["args"], resolved["checkpoint"]).fit()
    except charlm.CorpusError as exc:
        raise SystemExit(f"error: {exc}")
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Under torchrun, wait for every rank and take the process group down while the interpreter is whole: left
    to interpreter exit, gloo's threads are torn down with it, and a rank whose store server (rank 0's) had
    already gone could abort there ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    result = main()
    sys.exit(130 if result.get("interrupted") else 0)
