"""Bad input raises the error type torch.nn raises, with a message naming the argument and what was expected."""

import pytest
import torch
from torch import nn

import fastrnn

H = 4


def _lstm_state(B=2, L=1, dtype=torch.float32, device="cpu"):
    return (torch.randn(L, B, H, dtype=dtype, device=device), torch.randn(L, B, H, dtype=dtype, device=device))


CASES = {
    # name: (torch class, ctor kwargs, input, hx, words the fastrnn message must contain)
    "input_4d": (nn.LSTM, {}, lambda: torch.randn(2, 2, 2, 3), None, ["4D"]),
    "input_1d": (nn.GRU, {}, lambda: torch.randn(3), None, ["1D"]),
    "feature_size": (nn.GRU, {}, lambda: torch.randn(5, 2, 7), None, ["input_size", "3", "7"]),
    "hx_shape": (nn.GRU, {}, lambda: torch.randn(5, 2, 3), lambda: torch.randn(1, 3, H), ["hx", "(1, 2, 4)", "3"]),
    "hx_rank": (nn.RNN, {}, lambda: torch.randn(5, 2, 3), lambda: torch.randn(2, H), ["hx", "3-D", "2-D"]),
    "cx_shape": (nn.LSTM, {}, lambda: torch.randn(5, 2, 3), lambda: (torch.randn(1, 2, H), torch.randn(1, 2, H + 1)), ["hx[1]", "(1, 2, 4)"]),
    "gru_tuple_hx": (nn.GRU, {}, lambda: torch.randn(5, 2, 3), lambda: _lstm_state(), ["hx", "Tensor", "tuple"]),
    "lstm_tensor_hx": (nn.LSTM, {}, lambda: torch.randn(5, 2, 3), lambda: torch.randn(1, 2, H), ["tuple", "Tensor"]),
    "input_dtype": (nn.LSTM, {}, lambda: torch.randn(5, 2, 3, dtype=torch.float64), None, ["dtype", "float64", "float32"]),
    "hx_dtype": (nn.GRU, {}, lambda: torch.randn(5, 2, 3), lambda: torch.randn(1, 2, H, dtype=torch.float64), ["hx", "dtype", "float64"]),
    "cx_dtype": (nn.LSTM, {}, lambda: torch.randn(5, 2, 3), lambda: (torch.randn(1, 2, H), torch.randn(1, 2, H, dtype=torch.float64)), ["hx[1]", "dtype"]),
    "seq_len_0": (nn.RNN, {}, lambda: torch.randn(0, 2, 3), None, ["sequence length"]),
}


def _raise_of(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


@pytest.mark.parametrize("case", CASES)
def test_bad_input_same_error_type_as_torch(case):
    cls, kw, make_x, make_hx, words = CASES[case]
    ref = cls(3, H, **kw)
    fast = getattr(fastrnn, cls.__name__)(3, H, backend="reference", **kw)
    fast.load_state_dict(ref.state_dict())
    x = make_x()
    hx = make_hx() if make_hx else None
    call = (lambda m: m(x)) if hx is None else (lambda m: m(x, hx))
    torch_exc = _raise_of(lambda: call(ref))
    fast_exc = _raise_of(lambda: call(fast))
    assert isinstance(fast_exc, type(torch_exc)), (type(fast_exc), type(torch_exc), str(fast_exc))
    for w in words:
        assert w in str(fast_exc), (w, str(fast_exc))


def test_device_mismatch_names_both_devices():
    fast = fastrnn.GRU(3, H, backend="reference")
    with pytest.raises(RuntimeError, match=r"input is on meta.*weights are on cpu"):
        fast(torch.randn(5, 2, 3, device="meta"))
    with pytest.raises(RuntimeError, match=r"hx must be on the input's device cpu, got meta"):
        fast(torch.randn(5, 2, 3), torch.randn(1, 2, H, device="meta"))


@pytest.mark.parametrize(
    "ctor, words",
    [
        (lambda: fastrnn.LSTM(3, 4, proj_size=4), "proj_size has to be smaller than hidden_size"),
        (lambda: fastrnn.RNN(3, 4, nonlinearity="gelu"), "Unknown nonlinearity 'gelu'"),
        (lambda: fastrnn.RNNCell(3, 4, nonlinearity="gelu"), "Unknown nonlinearity: gelu"),
        (lambda: fastrnn.GRU(3, 4, proj_size=2), "proj_size argument is only supported for LSTM"),
        (lambda: fastrnn.LSTM(3, 4, dropout=1.5), "dropout should be a number in range"),
    ],
    ids=["proj_ge_hidden", "nonlinearity", "cell_nonlinearity", "gru_proj", "dropout"],
)
def test_bad_constructor_arguments(ctor, words):
    with pytest.raises(ValueError, match=words):
        ctor()


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
@pytest.mark.parametrize(
    "case", ["input_3d", "feature_size", "hx_3d", "batch_mismatch", "dtype"]
)
def test_cell_bad_input_same_error_type_as_torch(cls, case):
    ref = cls(3, H)
    fast = getattr(fastrnn, cls.__name__)(3, H, backend="reference")
    fast.load_state_dict(ref.state_dict())
    x = {"input_3d": torch.randn(1, 2, 3), "feature_size": torch.randn(2, 5), "dtype": torch.randn(2, 3, dtype=torch.float64)}.get(case, torch.randn(2, 3))
    h = {"hx_3d": torch.randn(1, 2, H), "batch_mismatch": torch.randn(3, H)}.get(case, torch.randn(2, H))
    hx = (h, torch.randn(2, H)) if cls is nn.LSTMCell else h
    torch_exc = _raise_of(lambda: ref(x, hx))
    fast_exc = _raise_of(lambda: fast(x, hx))
    assert isinstance(fast_exc, type(torch_exc)), (type(fast_exc), type(torch_exc), str(fast_exc))


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \('reference', 'cpp', 'triton'\), got 'cudnn'"):
        fastrnn.LSTM(3, 4, backend="cudnn")
    with pytest.raises(ValueError, match="got 'nope'"):
        fastrnn.set_backend("nope")


@pytest.mark.skipif(fastrnn.backend.reason_unavailable("cpp", torch.device("cpu"), torch.float32) is not None,
                    reason="cpp backend unavailable")
def test_pair_errors_name_the_direction_and_sizes():
    """layer.pair (both directions of a bidirectional layer) refuses a mismatched pair with the sizes of both."""
    from fastrnn.ops import LayerArgs, cpp

    def args(H, reverse, x=None):
        return LayerArgs("GRU", torch.randn(6, 3) if x is None else x, None, torch.randn(2, H), None, torch.randn(3 * H, 3), torch.randn(3 * H, H),
                         None, None, None, reverse)

    a = args(4, False)
    with pytest.raises(RuntimeError, match=r"reverse direction must have the forward one's sizes: H 4.*got H 5"):
        cpp.layer.pair(a, args(5, True, a.x))
    with pytest.raises(ValueError, match="reverse=False.*reverse=True"):
        cpp.layer.pair(a, args(4, False, a.x))
    with pytest.raises(ValueError, match="same mode, x and batch_sizes"):
        cpp.layer.pair(a, args(4, True))
    with pytest.raises(RuntimeError, match=r"w_hh must have shape \[12, 4\]"):
        cpp.layer.pair(a, args(4, True, a.x)._replace(w_hh=torch.randn(12, 3)))
