"""Train the zoo's real-weight CNN on scikit-learn's 8x8 digits, with numpy alone.

Architecture: conv 3x3 (1->8, pad 1) + ReLU, conv 3x3 stride 2 (8->16, pad 1) + ReLU, dense 256->10.
Training is full float64 Adam on a fixed seed, so the weights (and the ONNX digest) are reproducible
on one machine; it takes a few seconds.
"""

from __future__ import annotations

import numpy as np

Array = np.ndarray


def _im2col(x: Array, k: int, stride: int, pad: int) -> tuple[Array, int, int]:
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    cols = np.empty((n, c, k, k, ho, wo), x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
    return cols.reshape(n, c * k * k, ho * wo), ho, wo


def _col2im(cols: Array, shape: tuple[int, ...], k: int, stride: int, pad: int) -> Array:
    n, c, h, w = shape
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    cols = cols.reshape(n, c, k, k, ho, wo)
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), cols.dtype)
    for i in range(k):
        for j in range(k):
            xp[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += cols[:, :, i, j]
    return xp[:, :, pad : pad + h, pad : pad + w]


def _conv(x: Array, w: Array, b: Array, stride: int) -> tuple[Array, Array]:
    cols, ho, wo = _im2col(x, w.shape[2], stride, 1)
    out = np.einsum("ok,nkp->nop", w.reshape(w.shape[0], -1), cols) + b[None, :, None]
    return out.reshape(x.shape[0], w.shape[0], ho, wo), cols


def _conv_back(dout: Array, x: Array, cols: Array, w: Array, stride: int) -> tuple[Array, ...]:
    n, o = dout.shape[:2]
    d = dout.reshape(n, o, -1)
    dw = np.einsum("nop,nkp->ok", d, cols).reshape(w.shape)
    db = d.sum(axis=(0, 2))
    dcols = np.einsum("ok,nop->nkp", w.reshape(o, -1), d)
    return _col2im(dcols, x.shape, w.shape[2], stride, 1), dw, db


def load_digits_split(seed: int) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = len(x) * 3 // 4
    train, test = order[:cut], order[cut:]
    return (x[train], y[train]), (x[test], y[test])


def train_digits_cnn(
    seed: int = 0, epochs: int = 12, batch: int = 32, lr: float = 3e-3
) -> tuple[dict[str, Array], tuple[Array, Array], tuple[Array, Array]]:
    """Return (float32 weights, train split, test split)."""
    (x_train, y_train), test = load_digits_split(seed)
    rng = np.random.default_rng(seed)
    p: dict[str, Array] = {
        "conv1_w": rng.normal(0, np.sqrt(2 / 9), (8, 1, 3, 3)),
        "conv1_b": np.zeros(8),
        "conv2_w": rng.normal(0, np.sqrt(2 / 72), (16, 8, 3, 3)),
        "conv2_b": np.zeros(16),
        "fc_w": rng.normal(0, np.sqrt(1 / 256), (10, 256)),
        "fc_b": np.zeros(10),
    }
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(val) for k, val in p.items()}
    step = 0
    xs = x_train.astype(np.float64)
    for _ in range(epochs):
        order = rng.permutation(len(xs))
        for start in range(0, len(xs), batch):
            idx = order[start : start + batch]
            xb, yb = xs[idx], y_train[idx]
            a1, c1 = _conv(xb, p["conv1_w"], p["conv1_b"], 1)
            h1 = np.maximum(a1, 0)
            a2, c2 = _conv(h1, p["conv2_w"], p["conv2_b"], 2)
            h2 = np.maximum(a2, 0)
            flat = h2.reshape(len(xb), -1)
            logits = flat @ p["fc_w"].T + p["fc_b"]
            prob = np.exp(logits - logits.max(axis=1, keepdims=True))
            prob /= prob.sum(axis=1, keepdims=True)
            prob[np.arange(len(xb)), yb] -= 1
            dlogits = prob / len(xb)
            grads = {"fc_w": dlogits.T @ flat, "fc_b": dlogits.sum(0)}
            dh2 = (dlogits @ p["fc_w"]).reshape(h2.shape) * (a2 > 0)
            dh1, grads["conv2_w"], grads["conv2_b"] = _conv_back(dh2, h1, c2, p["conv2_w"], 2)
            _, grads["conv1_w"], grads["conv1_b"] = _conv_back(
                dh1 * (a1 > 0), xb, c1, p["conv1_w"], 1
            )
            step += 1
            for k, g in grads.items():
                m[k] = 0.9 * m[k] + 0.1 * g
                v[k] = 0.999 * v[k] + 0.001 * g * g
                mhat, vhat = m[k] / (1 - 0.9**step), v[k] / (1 - 0.999**step)
                p[k] -= lr * mhat / (np.sqrt(vhat) + 1e-8)
    weights = {k: val.astype(np.float32) for k, val in p.items()}
    return weights, (x_train, y_train), test
