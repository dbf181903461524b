"""Backends of fastrnn. Every backend module exposes the same three names.

``availability(device, dtype) -> str | None``
    ``None`` when the backend can run on ``device`` with ``dtype`` storage, otherwise a one-line reason.

``layer(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse) -> (y, h_n, c_n)``
    One layer in one direction over a whole sequence, differentiable with respect to every tensor input.

    - ``mode``: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"`` (``torch.nn.RNNBase.mode``).
    - ``x: [N, I]``: time-major rows. Dense input has ``batch_sizes=None`` and ``N = T*B`` with
      ``B = h0.shape[0]``; packed input has ``batch_sizes: int64 CPU [T]``, non-increasing, and the rows
      of step ``t`` are ``x[off_t : off_t + batch_sizes[t]]`` with ``off_t = sum(batch_sizes[:t])``.
    - ``h0: [B, Hout]`` (``Hout = proj_size or H``); ``c0: [B, H]`` for LSTM, else ``None``.
    - ``w_ih: [G*H, I]``, ``w_hh: [G*H, Hout]``, ``b_ih, b_hh: [G*H]`` or ``None``, ``w_hr: [Hout, H]``
      or ``None`` (LSTM projection); ``G`` is 4 (LSTM, gates i,f,g,o), 3 (GRU, gates r,z,n) or 1.
    - ``reverse``: process steps from ``T-1`` down to ``0`` (the backward direction of a bidirectional layer).
    - returns ``y: [N, Hout]`` (same row layout as ``x``), ``h_n: [B, Hout]`` and ``c_n: [B, H]`` (LSTM,
      else ``None``): each sequence's state after its own last step.

A row that is inactive at a step keeps its state untouched, so packed sequences need no padding: in the
forward direction a sequence stops updating after its last step, in reverse it starts from ``h0``.
"""

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
