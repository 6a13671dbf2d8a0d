"""Converts a Chorus checkpoint (HF layout) to GGUF with llama.cpp's own converter.

    PYTHONPATH=LLAMA_CPP/gguf-py python to_gguf.py LLAMA_CPP CHECKPOINT OUT.gguf

Run by a Python that has torch, numpy and safetensors (the HF virtualenv). Two adjustments,
both about what the converter expects of a published Nemotron-H rather than about the weights:
- Chorus' byte-level tokenizer.json has no BPE merges and matches none of the pre-tokenizers
  the converter knows, so the vocabulary is written without a tokenizer (token ids in, token
  ids out, which is all the benchmark needs).
- Chorus stores its MTP head as `mtp.*`, which the converter does not map, so the head is left
  out (`--no-mtp`); the benchmark measures plain decoding.
"""

import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    llama_cpp, checkpoint, out = sys.argv[1:]
    sys.path.insert(0, llama_cpp)
    from conversion import nemotron  # noqa: E402  (llama.cpp's converter package)

    nemotron.NemotronHModel.set_vocab = lambda self: self._set_vocab_none()
    sys.argv = [
        "convert_hf_to_gguf.py",
        checkpoint,
        "--outfile",
        out,
        "--outtype",
        "f32",
        "--no-mtp",
    ]
    runpy.run_path(str(Path(llama_cpp) / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
