"""The Tiny Shakespeare example (examples/shakespeare) and examples/next_word.py, on a small synthetic text."""

import importlib.util
import io
import math
import os
import random
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "examples" / "shakespeare"
sys.path.insert(0, str(SHAKESPEARE))

import charlm  # noqa: E402


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load("shakespeare_train", SHAKESPEARE / "train.py")
sample = _load("shakespeare_sample", SHAKESPEARE / "sample.py")
next_word = _load("examples_next_word", ROOT / "examples" / "next_word.py")

TINY = ["--hidden", "24", "--emb", "8", "--batch", "8", "--seq", "16", "--lr", "0.01", "--eval-every", "5",
        "--eval-batches", "2", "--backend", "auto", "--seed", "7"]


def make_text(n_lines: int = 300, seed: int = 0) -> str:
    """Lines of a few words drawn from a small lexicon: structure a small model picks up in a few steps."""
    rng = random.Random(seed)
    words = ["the", "king", "queen", "shall", "speak", "of", "love", "and", "war", "my", "lord", "good", "night"]
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(["KING", "QUEEN", "LORD"])
        lines.append(f"{speaker}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) + ".\n")
    return "\n".join(lines)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_text())
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    # the machine is shared; one thread also keeps the float results independent of the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(corpus, out, *extra):
    resolved = train.resolve_args(["--data", str(corpus), "--out", str(out), *TINY, *extra])
    r = train.Run(resolved["args"], resolved["checkpoint"])
    return r, r.fit()


def test_loss_decreases(corpus, tmp_path):
    r, summary = run(corpus, tmp_path / "a", "--steps", "40")
    first, last = sum(r.losses[:5]) / 5, sum(r.losses[-5:]) / 5
    assert last < first - 0.5
    vocab_size = len(set(corpus.read_text()))
    # an untrained model scores about log(vocabulary size), the loss of a uniform guess
    assert summary["val_loss"] < math.log(vocab_size) - 0.5
    assert summary["steps"] == 40
    for name in ("ckpt.pt", "loss.png", "train.log", "summary.json"):
        assert (tmp_path / "a" / name).is_file()


def test_batches_shard_the_data_between_ranks():
    ids = torch.arange(5000)
    rows = []
    for rank in range(2):
        b = charlm.Batches(ids, batch=4, seq=9, seed=3, rank=rank, world=2)
        rows.append({tuple(row.tolist()) for _ in range(b.steps_per_epoch()) for row in b.next()[0]})
    assert len(rows[0]) == len(rows[1]) == 4 * b.steps_per_epoch()
    assert not rows[0] & rows[1]
    for window in rows[0] | rows[1]:
        assert list(window) == list(range(window[0], window[0] + 9))


def test_carried_streams_continue_and_do_not_overlap_between_ranks():
    ids = torch.arange(5000)
    seen = []
    for rank in range(2):
        b = charlm.Batches(ids, batch=3, seq=10, seed=5, rank=rank, world=2, contiguous=True)
        x, y = b.next()
        assert torch.equal(y[:, :-1], x[:, 1:])
        mine = set(x.flatten().tolist())
        for _ in range(b.steps_per_epoch() - 1):
            x_next, y_next = b.next()
            assert torch.equal(x_next[:, 0], y[:, -1])  # each row picks up where it stopped
            mine |= set(x_next.flatten().tolist())
            y = y_next
        assert b.new_epoch
        seen.append(mine)
    assert not seen[0] & seen[1]
    assert len(seen[0]) == len(seen[1]) == 3 * 10 * b.steps_per_epoch()


def test_fastrnn_model_matches_torch_nn():
    x = torch.randint(20, (3, 11))
    outs = []
    for use_torch in (False, True):
        torch.manual_seed(0)
        model = charlm.CharRNN(20, emb=6, hidden=10, layers=2, cell="gru", use_torch=use_torch)
        outs.append(model(x)[0])
    torch.testing.assert_close(outs[0], outs[1])


def test_checkpoint_round_trip_loads_weights_only(corpus, tmp_path):
    r, _ = run(corpus, tmp_path / "a", "--steps", "6", "--cell", "rnn", "--nonlinearity", "relu")
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["vocab"] == "".join(sorted(set(corpus.read_text())))
    assert ckpt["args"]["cell"] == "rnn" and ckpt["args"]["nonlinearity"] == "relu"
    for name, tensor in r.model.state_dict().items():
        assert torch.equal(ckpt["model"][name], tensor), name
    model, vocab = sample.load_model(tmp_path / "a" / "ckpt.pt")
    x = vocab.encode("KING:\nthe king").unsqueeze(0)
    r.model.eval()
    torch.testing.assert_close(model(x)[0], r.model(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("extra", [[], ["--carry-state", "--layers", "2", "--dropout", "0.2", "--cell", "gru"]],
                         ids=["windows", "carry-state"])
def test_resume_is_bit_for_bit(corpus, tmp_path, extra):
    whole, _ = run(corpus, tmp_path / "whole", "--steps", "12", *extra)
    run(corpus, tmp_path / "split", "--steps", "7", *extra)
    resumed, _ = run(corpus, tmp_path / "split", "--steps", "12", "--resume", *extra)
    assert resumed.losses == whole.losses
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_a_different_model(corpus, tmp_path):
    run(corpus, tmp_path / "a", "--steps", "2")
    with pytest.raises(SystemExit, match="hidden"):
        train.resolve_args(["--out", str(tmp_path / "a"), "--resume", "--hidden", "32"])
    other = tmp_path / "other.txt"
    other.write_text(make_text(seed=1))
    with pytest.raises(SystemExit, match="not the text"):
        run(other, tmp_path / "a", "--resume", "--steps", "4")


def test_preset_then_command_line():
    seed = train.resolve_args(["--preset", "seed"])["args"]
    assert (seed["cell"], seed["hidden"], seed["emb"], seed["seq"], seed["lr"]) == ("gru", 1024, 256, 100, 1e-3)
    assert seed["steps"] == 10 * 172
    mine = train.resolve_args(["--preset", "seed", "--hidden", "64", "--time-budget", "9"])["args"]
    assert (mine["cell"], mine["hidden"], mine["time_budget"]) == ("gru", 64, 9.0)
    plain = train.resolve_args([])["args"]
    assert (plain["cell"], plain["hidden"], plain["emb"], plain["batch"], plain["seq"], plain["lr"], plain["clip"]) \
        == ("lstm", 512, 64, 64, 128, 2e-3, 1.0)


def test_interrupted_checkpoint_write_keeps_the_previous_one(corpus, tmp_path, monkeypatch):
    r, _ = run(corpus, tmp_path / "a", "--steps", "3")
    path = tmp_path / "a" / "ckpt.pt"
    before = path.read_bytes()

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    r.train_step()
    with pytest.raises(OSError, match="disk full"):
        r.save()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt", "loss.png", "summary.json", "train.log"]
    assert torch.load(path, weights_only=True)["step"] == 3


def test_ctrl_c_saves_a_checkpoint(corpus, tmp_path, monkeypatch):
    real_next = charlm.Batches.next
    calls = []

    def next_then_ctrl_c(self):
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)
        return real_next(self)

    monkeypatch.setattr(charlm.Batches, "next", next_then_ctrl_c)
    # the handler before the run is Python's default, or SIG_IGN in a process started in the background
    before = signal.getsignal(signal.SIGINT)
    _, result = run(corpus, tmp_path / "a", "--steps", "1000")
    assert result == {"interrupted": True, "step": 4}
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_time_budget_stops_and_summarises(corpus, tmp_path):
    _, summary = run(corpus, tmp_path / "a", "--time-budget", "0.5", "--eval-every", "0", "--save-every", "0")
    assert summary["stopped_by"] == "time budget"
    assert 0.5 <= summary["train_seconds"] < 30
    val_targets = len(corpus.read_text()) - int(len(corpus.read_text()) * 0.9) - 1
    assert summary["val_chars"] == val_targets


def test_cosine_decay_ends_at_a_tenth(corpus, tmp_path):
    resolved = train.resolve_args(["--data", str(corpus), "--out", str(tmp_path), *TINY, "--steps", "10",
                                   "--decay", "cosine"])
    r = train.Run(resolved["args"], None)
    lrs = []
    for _ in range(11):
        lrs.append(r.lr())
        r.step += 1
    assert lrs[0] == pytest.approx(0.01) and lrs[5] == pytest.approx(0.0055) and lrs[10] == pytest.approx(0.001)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_sampling_is_deterministic_and_matches_the_sequence_module(corpus, tmp_path):
    run(corpus, tmp_path / "a", "--steps", "10", "--layers", "2")
    ckpt = tmp_path / "a" / "ckpt.pt"
    model, vocab = sample.load_model(ckpt)
    texts = ["".join(sample.generate(model, vocab, "KING:", 60, temperature=1.0, seed=s)) for s in (1, 1, 2)]
    assert texts[0] == texts[1] != texts[2]

    streamed = io.StringIO()
    sample.main([str(ckpt), "--prime", "KING:", "--length", "60", "--temperature", "1", "--seed", "1"], streamed)
    assert streamed.getvalue() == "KING:" + texts[0] + "\n"

    # torch.nn's LSTM reads prime + generated text in one call; its logits must lead to the same choices
    ref = torch.load(ckpt, weights_only=True)
    torch_model = charlm.model_from_args(len(vocab), dict(ref["args"], torch=True))
    torch_model.load_state_dict(ref["model"])
    assert replay(torch_model, vocab, "KING:", texts[0], seed=1) == texts[0]


def replay(model, vocab, prime: str, text: str, seed: int) -> str:
    """The characters ``model`` picks reading ``prime + text`` in one sequence call, with sample.py's choice."""
    logits = model.eval()(vocab.encode(prime + text).unsqueeze(0))[0][0]
    gen = torch.Generator().manual_seed(seed)
    steps = range(len(prime) - 1, len(prime) - 1 + len(text))
    return "".join(vocab.chars[sample._pick(logits[t], 1.0, 0, gen)] for t in steps)


def test_new_cells_train_resume_and_sample(corpus, tmp_path):
    """--layer-norm --zoneout --recurrent-dropout: the loss falls, a resumed run redraws the same masks, and
    sampling step by step with the cells follows the sequence module (eval zoneout is deterministic)."""
    cells = ["--layer-norm", "--zoneout", "0.1", "--recurrent-dropout", "0.2", "--layers", "2"]
    whole, _ = run(corpus, tmp_path / "whole", "--steps", "12", *cells)
    assert any(n.startswith("rnn.layer_norm_") for n, _ in whole.model.named_parameters())
    assert whole.model.rnn.zoneout == 0.1 and whole.model.rnn.recurrent_dropout == 0.2
    run(corpus, tmp_path / "split", "--steps", "7", *cells)
    resumed, _ = run(corpus, tmp_path / "split", "--steps", "12", "--resume", *cells)
    assert resumed.losses == whole.losses
    model, vocab = sample.load_model(tmp_path / "whole" / "ckpt.pt")
    text = "".join(sample.generate(model, vocab, "KING:", 40, temperature=1.0, seed=3))
    assert replay(model, vocab, "KING:", text, seed=3) == text
    with pytest.raises(ValueError, match="torch.nn has no layer_norm"):
        charlm.model_from_args(len(vocab), dict(whole.args, torch=True))


def test_top_k_restricts_the_choice():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    picks = {sample._pick(logits, 5.0, 2, gen) for _ in range(200)}
    assert picks == {1, 2}
    assert sample._pick(logits, 0.0, 0, gen) == 1


def test_download_checks_the_hash(tmp_path, monkeypatch):
    source = tmp_path / "input.txt"
    source.write_text("To be, or not to be\n")
    good = charlm.sha256_of(source)
    cache = tmp_path / "cache"
    got = charlm.fetch_corpus(source.as_uri(), good, cache)
    assert got.read_text() == source.read_text()
    source.unlink()
    assert charlm.fetch_corpus(source.as_uri(), good, cache) == got  # served from the cache

    other = tmp_path / "other.txt"
    other.write_text("not the corpus")
    with pytest.raises(charlm.CorpusError, match="sha256"):
        charlm.fetch_corpus(other.as_uri(), good, tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []


def test_offline_without_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRNN_CACHE", str(tmp_path / "cache"))
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    with socket.socket() as s:  # a port nobody listens on: the connection is refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(charlm, "CORPUS_URL", f"http://127.0.0.1:{port}/input.txt")
    with pytest.raises(SystemExit, match=f"127.0.0.1:{port}.*--data PATH"):
        train.main(["--out", str(tmp_path / "a"), "--steps", "1"])


def _ddp_worker(rank, port, corpus, out, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    resolved = train.resolve_args(["--data", corpus, "--out", out, *TINY, "--steps", "6", "--dropout", "0.1"])
    r = train.Run(resolved["args"], None)
    summary = r.fit()
    torch.save({"model": r.model.state_dict(), "world": summary["world_size"],
                "first_batch": charlm.Batches(r.batches.ids, 8, 16, 7, rank, 2).next()[0]},
               os.path.join(results, f"rank{rank}.pt"))
    del r
    train.leave_process_group()


def test_two_process_ddp(corpus, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, results = tmp_path / "ddp", tmp_path / "results"
    results.mkdir()
    mp.spawn(_ddp_worker, args=(port, str(corpus), str(out), str(results)), nprocs=2)
    ranks = [torch.load(results / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])
    for name, p in ranks[0]["model"].items():
        assert torch.equal(p, ranks[1]["model"][name]), name
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and len(ckpt["rank_states"]) == 2
    torch.manual_seed(7)
    untrained = charlm.model_from_args(len(ckpt["vocab"]), ckpt["args"]).state_dict()
    assert not torch.equal(untrained["head.weight"], ranks[0]["model"]["head.weight"])
    for name, p in ranks[0]["model"].items():
        assert torch.equal(p, ckpt["model"][name]), name


def test_next_word_learns_and_completes(corpus):
    result = next_word.main(["--data", str(corpus), "--steps", "40", "--vocab", "30", "--context", "4",
                             "--emb", "8", "--hidden", "16", "--batch", "16", "--lr", "0.02", "--eval-every", "20",
                             "--prompt", "KING: the", "--words", "5", "--val-windows", "200"])
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert len(result["completion"]) == 5 and "<unk>" not in result["completion"]
    assert set(result["completion"]) <= set(next_word.tokenize(corpus.read_text()))
