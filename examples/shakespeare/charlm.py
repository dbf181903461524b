"""Pieces shared by ``train.py``, ``sample.py`` and ``../next_word.py``: the corpus, the vocabulary, the
batches, the character model and checkpoint files that ``torch.load(weights_only=True)`` accepts."""

import hashlib
import os
import random
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import fastrnn
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import fastrnn

CORPUS_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPUS_NAME = "tinyshakespeare.txt"


class CorpusError(RuntimeError):
    """The corpus could not be fetched, or what was fetched is not the expected file."""


def cache_dir() -> Path:
    return Path(os.environ.get("FASTRNN_CACHE") or Path.home() / ".cache" / "fastrnn")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_corpus(url: str, sha256: str = CORPUS_SHA256, cache: Optional[Path] = None,
                 timeout: float = 30.0) -> Path:
    """The cached corpus, downloading it first when the cache lacks a copy with the right hash."""
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / CORPUS_NAME
    if target.exists() and sha256_of(target) == sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=CORPUS_NAME + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
            except OSError as exc:  # urllib's URLError included
                reason = getattr(exc, "reason", exc)
                raise CorpusError(
                    f"could not download the corpus from {url} ({reason}). Without network access, pass "
                    f"--data PATH to a local copy of tinyshakespeare input.txt (sha256 {sha256})."
                ) from exc
        got = sha256_of(Path(tmp))
        if got != sha256:
            raise CorpusError(
                f"the file downloaded from {url} has sha256 {got}, expected {sha256}; it was not kept. "
                "Pass --data PATH to use a local copy."
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_text(data: Optional[str] = None) -> str:
    """The text of ``data`` when given, otherwise of the downloaded (and verified) corpus."""
    path = Path(data) if data else fetch_corpus(CORPUS_URL)
    if not path.is_file():
        raise CorpusError(f"--data {path}: no such file")
    return path.read_text(encoding="utf-8")


class Vocab:
    """Characters <-> ids, ids in sorted character order; stored in checkpoints as the plain string."""

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.index = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return torch.tensor([self.index[ch] for ch in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def split(ids: Tensor, train_fraction: float = 0.9) -> Tuple[Tensor, Tensor]:
    """The first ``train_fraction`` of the text for training, the rest (unseen text) for validation."""
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # a pure function of (seed, epoch): the loader's whole state is then its (epoch, step) position, which
    # makes resuming exact without saving a generator, and every DDP rank derives the same permutation
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class Batches:
    """Training batches of ``batch`` rows of ``seq + 1`` characters for one rank of ``world``.

    Default: each epoch cuts the training text into non-overlapping windows (at a random offset, so window
    boundaries move between epochs), shuffles them, and deals them out, rank ``r`` taking every
    ``world``-th window. ``contiguous=True`` (truncated BPTT with carried state) instead cuts the text
    into ``batch * world`` streams and row ``i`` of consecutive batches continues stream ``i`` where the
    previous batch stopped, so the hidden state can be carried from one batch to the next.
    """

    def __init__(self, ids: Tensor, batch: int, seq: int, seed: int, rank: int = 0, world: int = 1,
                 contiguous: bool = False) -> None:
        self.ids, self.batch, self.seq, self.seed = ids, batch, seq, seed
        self.rank, self.world, self.contiguous = rank, world, contiguous
        self.epoch = 0
        self.step_in_epoch = 0
        self._cache_epoch = -1
        if self.steps_per_epoch() < 1:
            raise ValueError(
                f"{len(ids)} training characters are too few for batches of {batch} x {seq + 1} "
                f"on {world} process(es)"
            )

    def steps_per_epoch(self) -> int:
        usable = len(self.ids) - 1 - self.seq  # room for any offset in [0, seq]
        if self.contiguous:
            return (usable // (self.batch * self.world)) // self.seq
        return (usable // (self.seq + 1)) // (self.batch * self.world)

    def _prepare(self) -> None:
        if self._cache_epoch == self.epoch:
            return
        gen = _epoch_generator(self.seed, self.epoch)
        offset = int(torch.randint(self.seq + 1, (1,), generator=gen))
        if self.contiguous:
            streams = self.batch * self.world
            length = (len(self.ids) - 1 - self.seq) // streams
            rows = self.ids[offset: offset + streams * length + 1]
            # stream s is rows[s*length : (s+1)*length + 1]; keep this rank's block of streams
            starts = torch.arange(self.rank * self.batch, (self.rank + 1) * self.batch) * length
            self._streams = torch.stack([rows[s: s + length + 1] for s in starts.tolist()])
        else:
            n = (len(self.ids) - 1 - self.seq) // (self.seq + 1)
            windows = self.ids[offset: offset + n * (self.seq + 1)].view(n, self.seq + 1)
            order = torch.randperm(n, generator=gen)[self.rank:: self.world]
            self._windows = windows[order]
        self._cache_epoch = self.epoch

    @property
    def new_epoch(self) -> bool:
        """True when the next batch starts an epoch (where a carried state has to be dropped)."""
        return self.step_in_epoch == 0

    def next(self) -> Tuple[Tensor, Tensor]:
        self._prepare()
        i = self.step_in_epoch
        if self.contiguous:
            chunk = self._streams[:, i * self.seq: (i + 1) * self.seq + 1]
        else:
            chunk = self._windows[i * self.batch: (i + 1) * self.batch]
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch():
            self.epoch += 1
            self.step_in_epoch = 0
        return chunk[:, :-1], chunk[:, 1:]

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])


def eval_windows(ids: Tensor, seq: int) -> Tuple[Tensor, Tensor]:
    """Rows of ``seq + 1`` characters that together predict every character of ``ids`` after the first
    exactly once, and the mask of the targets to count.

    Rows do not overlap except the last, which ends at the end of the text; its targets that the row
    before already predicted are masked out.
    """
    n = len(ids) - 1
    if n < seq:
        raise ValueError(f"the validation text ({len(ids)} characters) is shorter than one sequence ({seq})")
    starts = list(range(0, n - seq + 1, seq))
    mask = torch.ones(len(starts), seq, dtype=torch.bool)
    if starts[-1] + seq < n:
        overlap = starts[-1] + seq - (n - seq)
        starts.append(n - seq)
        mask = torch.cat([mask, torch.arange(seq).ge(overlap).unsqueeze(0)])
    return torch.stack([ids[s: s + seq + 1] for s in starts]), mask


_CELLS = {"lstm": ("LSTM", "LSTMCell"), "gru": ("GRU", "GRUCell"), "rnn": ("RNN", "RNNCell")}


class CharRNN(nn.Module):
    """Embedding -> recurrent layers (fastrnn, or torch.nn with ``use_torch``) -> dropout -> linear.

    Parameter names are the same either way, so a checkpoint trained on one loads into the other.
    """

    def __init__(self, vocab_size: int, emb: int = 64, hidden: int = 512, layers: int = 1, cell: str = "lstm",
                 nonlinearity: str = "tanh", dropout: float = 0.0, backend: str = "auto",
                 use_torch: bool = False, layer_norm: bool = False, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise ValueError(f"cell must be one of {sorted(_CELLS)}, got {cell!r}")
        self.cell, self.backend = cell, backend
        self.ext = dict(layer_norm=layer_norm, zoneout=zoneout, recurrent_dropout=recurrent_dropout)
        if use_torch and (layer_norm or zoneout or recurrent_dropout):
            raise ValueError("torch.nn has no layer_norm, zoneout or recurrent_dropout: drop them or use fastrnn")
        self.embed = nn.Embedding(vocab_size, emb)
        kwargs = dict(num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        if cell == "rnn":
            kwargs["nonlinearity"] = nonlinearity
        if use_torch:
            self.rnn = getattr(nn, _CELLS[cell][0])(emb, hidden, **kwargs)
        else:
            self.rnn = getattr(fastrnn, _CELLS[cell][0])(emb, hidden, backend=backend, **self.ext, **kwargs)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor, state=None):
        out, state = self.rnn(self.embed(x), state)
        return self.head(self.drop(out)), state

    def step_cells(self, backend: Optional[str] = None) -> List[nn.Module]:
        """One fastrnn ``*Cell`` per layer holding the same parameter objects as ``self.rnn``."""
        cls = getattr(fastrnn, _CELLS[self.cell][1])
        rnn = self.rnn
        cells = []
        for k in range(rnn.num_layers):
            kwargs = {"nonlinearity": rnn.nonlinearity} if self.cell == "rnn" else {}
            with torch.device("meta"):
                c = cls(rnn.input_size if k == 0 else rnn.hidden_size, rnn.hidden_size, rnn.bias,
                        backend=backend or self.backend, **self.ext, **kwargs)
            for name in c._parameters:
                c._parameters[name] = getattr(rnn, f"{name}_l{k}")
            cells.append(c.train(self.training))
        return cells


def model_from_args(vocab_size: int, args: Dict) -> CharRNN:
    return CharRNN(vocab_size, emb=args["emb"], hidden=args["hidden"], layers=args["layers"], cell=args["cell"],
                   nonlinearity=args["nonlinearity"], dropout=args["dropout"], backend=args["backend"],
                   use_torch=args["torch"], layer_norm=args.get("layer_norm", False),
                   zoneout=args.get("zoneout", 0.0), recurrent_dropout=args.get("recurrent_dropout", 0.0))


def detach_state(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def rng_state() -> Dict:
    """This process's torch, numpy and python RNG states as tensors and plain containers only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def save_atomic(obj: Dict, path: Path) -> None:
    """Write ``obj`` to a temporary file next to ``path`` and rename it over ``path`` only once complete,
    so a crash or Ctrl-C mid-write leaves the previous checkpoint as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path) -> Dict:
    # weights_only: a checkpoint from elsewhere is data, never code
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def evaluate(model: nn.Module, windows: Tensor, mask: Tensor, batch: int, rank: int = 0, world: int = 1,
             limit: Optional[int] = None) -> Tuple[float, int]:
    """Summed cross-entropy (nats) and count of the masked-in targets of ``windows``, each row starting
    from a zero state.

    With ``world > 1`` every rank takes every ``world``-th batch; the caller sums over ranks.
    ``limit`` keeps only the first ``limit`` batches (the fixed sample of a periodic evaluation).
    """
    was_training = model.training
    model.eval()
    starts = list(range(0, windows.size(0), batch))[:limit]
    total, count = 0.0, 0
    for b in starts[rank::world]:
        rows, keep = windows[b: b + batch], mask[b: b + batch]
        logits, _ = model(rows[:, :-1])
        losses = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
        total += float(losses[keep].sum(dtype=torch.float64))
        count += int(keep.sum())
    model.train(was_training)
    return total, count
