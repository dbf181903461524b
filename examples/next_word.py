"""Word-level next-word prediction on Tiny Shakespeare with a many-to-one fastrnn LSTM.

The model reads ``--context`` words (embedding -> LSTM), keeps only the LSTM's last hidden state, and a
linear layer scores every word of the vocabulary as the next one. After training it completes ``--prompt``.

    python examples/next_word.py --data /path/to/input.txt --steps 2000 --prompt "to be or not to"
"""

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "shakespeare"))
import charlm  # noqa: E402
from charlm import fastrnn  # noqa: E402

UNK = "<unk>"
# words with inner apostrophes ("o'er", "'tis") and punctuation as tokens of their own
TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)*|'[a-z]+|[.,;:!?]")


def tokenize(text: str) -> List[str]:
    return TOKEN.findall(text.lower())


class WordVocab:
    def __init__(self, words: List[str]) -> None:
        self.words = [UNK] + [w for w in words if w != UNK]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_tokens(cls, tokens: List[str], size: int) -> "WordVocab":
        # most frequent first; ties in order of first appearance, which Counter keeps
        return cls([w for w, _ in Counter(tokens).most_common(size - 1)])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: List[str]) -> Tensor:
        return torch.tensor([self.index.get(t, 0) for t in tokens], dtype=torch.long)


class NextWord(nn.Module):
    def __init__(self, vocab_size: int, emb: int, hidden: int, layers: int = 1, dropout: float = 0.0,
                 backend: str = "auto", use_torch: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, emb)
        kwargs = dict(num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        if use_torch:
            self.lstm = nn.LSTM(emb, hidden, **kwargs)
        else:
            self.lstm = fastrnn.LSTM(emb, hidden, backend=backend, **kwargs)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, words: Tensor) -> Tensor:
        _, (h, _) = self.lstm(self.embed(words))
        return self.head(self.drop(h[-1]))


def examples(ids: Tensor, context: int) -> Tuple[Tensor, Tensor]:
    """Every window of ``context`` words, and the word after it."""
    windows = ids.unfold(0, context + 1, 1)
    return windows[:, :-1], windows[:, -1]


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1024) -> Tuple[float, float]:
    model.eval()
    correct, total = 0, 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i: i + batch])
        total += float(F.cross_entropy(logits, y[i: i + batch], reduction="sum"))
        correct += int((logits.argmax(1) == y[i: i + batch]).sum())
    model.train()
    return correct / len(x), total / len(x)


@torch.no_grad()
def complete(model: nn.Module, vocab: WordVocab, prompt: str, words: int, context: int,
             temperature: float = 0.0, seed: int = 0) -> List[str]:
    """``words`` predicted words after ``prompt``; greedy at temperature 0, never choosing ``<unk>``."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    ids = vocab.encode(tokenize(prompt)).tolist()
    if not ids:
        raise ValueError("the prompt has no words")
    out = []
    for _ in range(words):
        logits = model(torch.tensor([ids[-context:]]))[0]
        logits[0] = float("-inf")
        if temperature > 0:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        ids.append(nxt)
        out.append(vocab.words[nxt])
    return out


def detokenize(tokens: List[str]) -> str:
    return re.sub(r" ([.,;:!?])", r"\1", " ".join(tokens))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="local copy of the corpus (default: download and cache it)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--vocab", type=int, default=4000, help="keep the most frequent words; the rest become <unk>")
    p.add_argument("--context", type=int, default=12, help="words the model reads before predicting")
    p.add_argument("--emb", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--val-windows", type=int, default=4000, help="evenly spaced validation windows to score")
    p.add_argument("--prompt", default="to be or not to")
    p.add_argument("--words", type=int, default=12, help="words to add to the prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", *fastrnn.BACKENDS])
    p.add_argument("--torch", action="store_true", help="torch.nn.LSTM instead of fastrnn's (A/B)")
    return p


def main(argv: Optional[List[str]] = None) -> dict:
    a = parser().parse_args(argv)
    torch.manual_seed(a.seed)
    try:
        tokens = tokenize(charlm.load_text(a.data))
    except charlm.CorpusError as exc:
        raise SystemExit(f"error: {exc}")
    cut = int(len(tokens) * 0.9)
    vocab = WordVocab.from_tokens(tokens[:cut], a.vocab)
    ids = vocab.encode(tokens)
    x_train, y_train = examples(ids[:cut], a.context)
    x_val, y_val = examples(ids[cut:], a.context)
    if len(x_val) > a.val_windows:
        keep = torch.linspace(0, len(x_val) - 1, a.val_windows).long()
        x_val, y_val = x_val[keep], y_val[keep]
    print(f"{len(tokens):,} tokens, vocabulary {len(vocab):,}, {len(x_train):,} training windows of {a.context} words")

    model = NextWord(len(vocab), a.emb, a.hidden, a.layers, a.dropout, a.backend, a.torch)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(a.seed)
    t0 = time.perf_counter()
    history = []
    for step in range(1, a.steps + 1):
        pick = torch.randint(len(x_train), (a.batch,), generator=gen)
        loss = F.cross_entropy(model(x_train[pick]), y_train[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        history.append(loss.item())
        if step % a.eval_every == 0 or step == a.steps:
            acc, val = accuracy_and_loss(model, x_val, y_val)
            recent = sum(history[-a.eval_every:]) / len(history[-a.eval_every:])
            print(f"step {step}: train {recent:.3f}, val {val:.3f} nats/word, val top-1 {acc:.1%}, "
                  f"{time.perf_counter() - t0:.0f} s")
    words = complete(model, vocab, a.prompt, a.words, a.context, a.temperature, a.seed)
    print(f"{a.prompt} -> {detokenize(words)}")
    return {"losses": history, "val_loss": val, "val_accuracy": acc, "completion": words}


if __name__ == "__main__":
    main()
