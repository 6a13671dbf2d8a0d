"""Policy versions as `StreamWeights` sends them: every tensor as little-endian f32 chunks, the
last chunk carrying the SHA-256 that `chorus_proto::checksum::WeightDigest` computes (each
chunk's name, dtype, shape, byte offset and data, length-prefixed, in stream order), so Chorus'
workers verify them as they verify Chorus' learner's."""

import hashlib
import struct

from ._proto import common_pb2, learner_pb2

F32 = common_pb2.DTYPE_F32


def encode(run_id, version, tensors, max_chunk_bytes=1 << 20):
    """Chunks of `tensors` (name -> float32 numpy-convertible tensor), sorted by name as
    Chorus' learner sends them, sealed with the stream's digest."""
    per_chunk = max(max_chunk_bytes // 4, 1)
    chunks = []
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").float().contiguous()
        shape = list(t.shape)
        data = t.numpy().astype("<f4").tobytes()
        n = t.numel()
        start = 0
        while True:
            end = min(start + per_chunk, n)
            chunks.append(learner_pb2.WeightChunk(
                run_id=run_id, policy_version=version, chunk_index=len(chunks),
                tensor_name=name, dtype=F32, shape=shape, offset=start * 4,
                data=data[start * 4:end * 4],
            ))
            start = end
            if start >= n:
                break
    seal(chunks, version)
    return chunks


def seal(chunks, version):
    # SHA-256 from the standard library; Chorus' Rust learner seals with BLAKE3, and receivers
    # take either, as each chunk's `digest_algorithm` says.
    digest = hashlib.sha256()
    for i, c in enumerate(chunks):
        c.chunk_index = i
        c.policy_version = version
        c.last = i + 1 == len(chunks)
        c.digest = b""
        c.digest_algorithm = common_pb2.DIGEST_ALGORITHM_SHA256
        name = c.tensor_name.encode()
        digest.update(struct.pack("<Q", len(name)))
        digest.update(name)
        digest.update(struct.pack("<i", c.dtype))
        digest.update(struct.pack("<Q", len(c.shape)))
        for d in c.shape:
            digest.update(struct.pack("<Q", d))
        digest.update(struct.pack("<Q", c.offset))
        digest.update(struct.pack("<Q", len(c.data)))
        digest.update(c.data)
    if chunks:
        chunks[-1].digest = digest.digest()
