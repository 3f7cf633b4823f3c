"""Automatic prefix caching, as vLLM's: the KV cache of prompt prefixes that requests share (a system prompt,
a few-shot header, a conversation so far) is kept and reused, so a new request computes only the rest of its
prompt.

The cache holds blocks of BLOCK tokens. A block's key is a digest of every token up to its end (so a block
is only ever reused after the same prefix) and of the adapter that computed it (the same tokens through
another adapter have other keys and values):

    block i of prompt p, adapter a: key = blake2b(key of block i-1 | tokens of block i), seeded by a
    value: per layer (keys (1, H_kv, BLOCK, D), values (1, H_kv, BLOCK, D))

A lookup walks a prompt's blocks from the first and stops at the first one missing; it never covers the
prompt's last token, whose logits the prefill must compute. Blocks are evicted least recently used, once
their bytes pass `max_bytes`; a use touches a prompt's blocks last to first, so a shared first block
outlives the tails that follow it.
"""
from __future__ import annotations

import collections
import hashlib
from array import array

import torch

BLOCK = 16

Layers = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = BLOCK):
        self.max_bytes, self.block = max_bytes, block
        self.blocks: collections.OrderedDict[bytes, Layers] = collections.OrderedDict()  # LRU first
        self.bytes = 0
        self.hits = self.lookups = 0  # prompts that reused a prefix, prompts looked up
        self.reused_tokens = 0

    def _keys(self, adapter: str | None, ids: list[int], n_blocks: int) -> list[bytes]:
        keys, digest = [], hashlib.blake2b(repr(adapter).encode(), digest_size=16).digest()
        for i in range(n_blocks):
            chunk = array("q", ids[i * self.block:(i + 1) * self.block]).tobytes()
            digest = hashlib.blake2b(digest + chunk, digest_size=16).digest()
            keys.append(digest)
        return keys

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the first block ends most recently used
            self.blocks.move_to_end(key)

    def lookup(self, adapter: str | None, ids: list[int]) -> tuple[int, Layers | None]:
        """(tokens of `ids` whose KV is cached, that KV per layer (1, H, n, D)); (0, None) on a miss."""
        self.lookups += 1
        found = []
        for key in self._keys(adapter, ids, (len(ids) - 1) // self.block):
            if key not in self.blocks:
                break
            found.append(key)
        if not found:
            return 0, None
        self._touch(found)
        self.hits += 1
        self.reused_tokens += len(found) * self.block
        layers = [(torch.cat([self.blocks[k][i][0] for k in found], dim=2),
                   torch.cat([self.blocks[k][i][1] for k in found], dim=2)) for i in range(len(self.blocks[found[0]]))]
        return len(found) * self.block, layers

    def store(self, adapter: str | None, ids: list[int], layers: Layers) -> None:
        """Keep the KV of `ids`' whole blocks; `layers`: per layer (1, H, T, D) for exactly the tokens `ids`."""
        keys = self._keys(adapter, ids, len(ids) // self.block)
        for i, key in enumerate(keys):
            if key in self.blocks:
                continue
            at = slice(i * self.block, (i + 1) * self.block)
            # Copies: a slice would keep the whole prompt's (and the batch's) storage alive.
            entry = [(k[:, :, at].clone(), v[:, :, at].clone()) for k, v in layers]
            size = sum(k.nbytes + v.nbytes for k, v in entry)
            if size > self.max_bytes:
                return
            self.blocks[key] = entry
            self.bytes += size
        self._touch(keys)
        while self.bytes > self.max_bytes:
            _, entry = self.blocks.popitem(last=False)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in entry)

    def stats(self) -> dict:
        return {"blocks": len(self.blocks), "bytes": self.bytes, "hits": self.hits, "lookups": self.lookups,
                "reused_tokens": self.reused_tokens}
