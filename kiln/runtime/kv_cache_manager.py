"""Paged KV-cache bookkeeping: a block pool with ref counts, prefix caching by chained block hashes,
and LRU eviction of cached blocks nobody holds.

A block that no sequence holds stays in the free queue with its hash, so a later request with the
same prefix can take it back; it is only forgotten when the pool hands it out for new content.
Free blocks leave the queue from the front (least recently freed first).
"""

from collections import OrderedDict

from kiln.runtime.sequence import Sequence, block_table


def block_hash(parent: int | tuple | None, tokens: tuple[int, ...], salt: str | None = None) -> int:
    """Chained hash of one full block; a request's ``cache_salt`` enters its first block's hash."""
    return hash((parent, tokens)) if salt is None else hash((parent, tokens, salt))


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        old = self.hash_of[block]
        if old is not None:  # evict: its content is about to be overwritten
            del self.cached[old]
            self.hash_of[block] = None
        self.ref_counts[block] = 1
        return block

    def take(self, block: int) -> None:
        """Add a holder to a (possibly free, cached) block."""
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_queue[block] = None

    def register(self, block: int, h: int) -> None:
        if h not in self.cached and self.hash_of[block] is None:
            self.cached[h] = block
            self.hash_of[block] = h

    def reset_cache(self) -> bool:
        """Forget every cached hash; only possible when no block is held."""
        if self.num_free != self.num_blocks:
            return False
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks
        return True


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.queries = 0  # tokens looked up in the prefix cache
        self.hits = 0  # tokens found there

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _full_block_hashes(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Chained hashes of the full blocks among the first ``num_tokens`` tokens.

        Extends ``seq.block_hashes`` as the sequence grows; tokens never change once there. The chain
        starts from the sequence's LoRA adapter id, so blocks are never shared across adapters.
        """
        bs, hashes = self.block_size, seq.block_hashes
        root = ("lora", seq.lora_id) if seq.lora_id else None
        for i in range(len(hashes), num_tokens // bs):
            tokens = tuple(seq.token_slice(i * bs, (i + 1) * bs))
            hashes.append(
                block_hash(hashes[-1], tokens) if hashes else block_hash(root, tokens, seq.cache_salt)
            )
        return hashes if len(hashes) == num_tokens // bs else hashes[: num_tokens // bs]

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks covering a prefix of ``seq`` (at least one token is always left to compute)."""
        if not self.enable_prefix_caching or not seq.reads_prefix_cache:
            return []
        found = []
        for h in self._full_block_hashes(seq, seq.num_tokens - 1):
            block = self.pool.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.queries += num_tokens
        self.hits += num_hit_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``seq`` (after any ``cached_blocks``).

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        total = seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        needed = self.blocks_needed(total) - len(seq.block_ids) - len(cached_blocks)
        if needed <= 0 and not cached_blocks:  # the common case: a running sequence within its blocks
            return True
        # cached blocks sitting in the free queue count as free until taken
        reclaimable = sum(1 for b in cached_blocks if self.pool.ref_counts[b] == 0)
        if needed > self.pool.num_free - reclaimable:
            return False
        for b in cached_blocks:
            self.pool.take(b)
        seq.block_ids.extend(cached_blocks)
        seq.block_ids.extend(self.pool.allocate() for _ in range(max(needed, 0)))
        return True

    def cache_computed_blocks(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Publish the hashes of the blocks whose every token is now computed (the first
        ``num_tokens``, by default all computed tokens)."""
        if not self.enable_prefix_caching:
            return
        num_tokens = seq.num_computed_tokens if num_tokens is None else num_tokens
        if num_tokens // self.block_size == seq.num_published_blocks:  # no block filled since
            return
        hashes = self._full_block_hashes(seq, num_tokens)
        for i in range(seq.num_published_blocks, len(hashes)):
            self.pool.register(seq.block_ids[i], hashes[i])
        seq.num_published_blocks = len(hashes)

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give ``child`` (a fork of ``parent``, the same tokens so far) the parent's computed KV: its
        full blocks shared (one more holder each) and its last, partial block copied into a new
        block. Returns that copy's ``(src, dst)`` block ids, which the worker applies before the next
        forward. With no free block the child gets the full blocks only and computes the partial
        block's tokens again."""
        bs, computed = self.block_size, parent.num_computed_tokens
        full = computed // bs
        child.block_ids = parent.block_ids[:full]
        for b in child.block_ids:
            self.pool.take(b)
        child.num_published_blocks = min(parent.num_published_blocks, full)
        child.num_computed_tokens = full * bs
        if computed == full * bs or self.pool.num_free == 0:
            return None
        dst = self.pool.allocate()
        child.block_ids.append(dst)
        child.num_computed_tokens = computed
        return parent.block_ids[full], dst

    def free(self, seq: Sequence) -> None:
        # release tail first so that, among a sequence's blocks, the later ones are evicted first
        for b in reversed(seq.block_ids):
            self.pool.release(b)
        seq.block_ids = block_table()
        seq.num_published_blocks = 0

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_cache()
