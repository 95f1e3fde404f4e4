"""The plain, obviously-correct ContMix operators (ARCHITECTURE.md section 5).

Every fast backend is tested against these functions. They gather the K*K clamped windows
explicitly, so they cost K*K copies of the values: fine for tests, never for training.
"""

from __future__ import annotations

import torch


def window_starts(length: int, kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """First row (or column) of the clamped window of every output position.

    Windows never leave the map: near a border the window slides inwards instead of being
    zero padded, so every window holds exactly K*K real neighbours.
    """
    idx = torch.arange(length, device=device)
    return (idx - kernel_size // 2).clamp(0, length - kernel_size)


def _window_index(length: int, kernel_size: int, device: torch.device | None) -> torch.Tensor:
    """(length, K) absolute indices of the window of each position."""
    offsets = torch.arange(kernel_size, device=device)
    return window_starts(length, kernel_size, device)[:, None] + offsets[None, :]


def rpb_index(height: int, width: int, kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(H, W, K*K) flat indices into a (2K-1)*(2K-1) bias table, one per window slot.

    The bias of a slot depends on the offset between the neighbour and the query position,
    which near a border is no longer centred: hence an index per position, not per slot.
    """
    span = 2 * kernel_size - 1
    rows = _window_index(height, kernel_size, device) - torch.arange(height, device=device)[:, None]
    cols = _window_index(width, kernel_size, device) - torch.arange(width, device=device)[:, None]
    rows = rows + kernel_size - 1
    cols = cols + kernel_size - 1
    flat = rows[:, None, :, None] * span + cols[None, :, None, :]
    return flat.reshape(height, width, kernel_size * kernel_size)


def gather_rpb(rpb: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """(heads, 2K-1, 2K-1) bias table -> (heads, H, W, K*K) bias of every window slot."""
    index = rpb_index(height, width, kernel_size, rpb.device)
    return rpb.flatten(1)[:, index]


def aggregate(probs: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """NA(p, v, K): out[b,g,i,j] = sum_{a,b'} p[b,g,i,j,a*K+b'] * v[b,g,si+a,sj+b'].

    probs (B, heads, H, W, K*K), value (B, heads, H, W, c) -> (B, heads, H, W, c).
    """
    batch, heads, height, width, channels = value.shape
    k = kernel_size
    rows = _window_index(height, k, value.device)  # (H, K)
    cols = _window_index(width, k, value.device)  # (W, K)
    windows = value[:, :, rows]  # (B, g, H, K, W, c)
    windows = windows[:, :, :, :, cols]  # (B, g, H, K, W, K, c)
    windows = windows.permute(0, 1, 2, 4, 3, 5, 6)  # (B, g, H, W, K, K, c)
    weights = probs.reshape(batch, heads, height, width, k, k, 1).to(windows.dtype)
    return (weights * windows).sum(dim=(4, 5))


def contmix(logits: torch.Tensor, rpb: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """NA(softmax(logits + rpb at the clamped windows), value): the whole ContMix mixing step."""
    height, width = logits.shape[2:4]
    biased = logits.float() + gather_rpb(rpb.float(), height, width, kernel_size)
    probs = biased.softmax(dim=-1)
    return aggregate(probs, value.float(), kernel_size).to(value.dtype)
