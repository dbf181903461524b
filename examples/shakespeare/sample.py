"""Generate text from a checkpoint written by train.py, one character at a time, streamed to stdout.

    python examples/shakespeare/sample.py runs/lstm/ckpt.pt --prime "ROMEO:" --length 500 --temperature 0.8
"""

import argparse
import sys
from pathlib import Path
from typing import Iterator, List, Optional, TextIO

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import charlm  # noqa: E402
from charlm import fastrnn  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--prime", default="\n", help="text the model reads before it starts writing")
    p.add_argument("--length", type=int, default=500, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="below 1 is more conservative; 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample only among the k likeliest characters (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", *fastrnn.BACKENDS])
    return p


def load_model(path, backend: str = "auto"):
    ckpt = charlm.load_checkpoint(path)
    vocab = charlm.Vocab(ckpt["vocab"])
    # the fastrnn modules whatever the checkpoint was trained with: the parameter names are the same
    args = dict(ckpt["args"], torch=False, backend=backend)
    model = charlm.model_from_args(len(vocab), args)
    model.load_state_dict(ckpt["model"])
    return model.eval(), vocab


def _layers_state(model, state) -> List:
    """The (layers, 1, hidden) state of the whole module as one state per cell."""
    if model.cell == "lstm":
        h, c = state
        return [(h[k], c[k]) for k in range(h.size(0))]
    return [state[k] for k in range(state.size(0))]


def _pick(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


@torch.no_grad()
def generate(model, vocab: charlm.Vocab, prime: str, length: int, temperature: float = 0.8, top_k: int = 0,
             seed: int = 0) -> Iterator[str]:
    """Yield ``length`` characters following ``prime``.

    The prime goes through the trained sequence module in one call; generation then carries each layer's
    state through fastrnn ``*Cell`` modules that hold the same parameters, one character per call.
    """
    if not prime:
        raise ValueError("--prime must hold at least one character")
    gen = torch.Generator().manual_seed(seed)
    logits, state = model(vocab.encode(prime).unsqueeze(0))
    states = _layers_state(model, state)
    cells = model.step_cells()
    last = logits[0, -1]
    for _ in range(length):
        idx = _pick(last, temperature, top_k, gen)
        yield vocab.chars[idx]
        x = model.embed(torch.tensor([idx]))
        for k, cell in enumerate(cells):
            states[k] = cell(x, states[k])
            x = states[k][0] if model.cell == "lstm" else states[k]
        last = model.head(x)[0]


def main(argv: Optional[List[str]] = None, out: TextIO = sys.stdout) -> None:
    a = parser().parse_args(argv)
    model, vocab = load_model(a.checkpoint, a.backend)
    out.write(a.prime)
    for ch in generate(model, vocab, a.prime, a.length, a.temperature, a.top_k, a.seed):
        out.write(ch)
        out.flush()
    out.write("\n")


if __name__ == "__main__":
    main()
