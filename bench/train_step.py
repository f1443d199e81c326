"""Stage-1 train-step throughput against this machine's float32 matmul peak.

Run from the repository root:

  python bench/train_step.py                       # the default stage-1 model, batch 256
  python bench/train_step.py --batch=1024 --rounds=10
  python bench/train_step.py --xla_flags=--xla_cpu_multi_thread_eigen=false
  python bench/train_step.py --width=256 --variants=dtype=bfloat16   # f32 and mixed precision
  python bench/train_step.py --variants='devices=1;devices=2'         # 4 CPU devices vs 1, 2
  python bench/train_step.py --config=configs/pretrain.py:tiny --steps=2  # a quick check
  python bench/train_step.py --torch_peer      # also the PyTorch peer (pip install -e '.[bench]')

One run measures:

1. the float32 matmul peak: a jitted `jnp.dot` of square matrices of a few sizes, on the
   first device (which uses every core); the best FLOP/s any size reaches. For a bfloat16
   model (`--dtype` or a `dtype=` variant) also the bfloat16 peak, with float32 accumulation
   and output as the model's matmuls have;
2. the train step exactly as `modit_jax.cli.train` builds it (`models.make_model`,
   `models.denoising_loss_fn`, `engine.make_optimizer`, `engine.create_train_state`,
   `engine.jit_train_step` over the mesh `engine.train_mesh` picks, donated state), on a
   random batch of unit embeddings with every context slot real. On CPU the binaries' default
   number of devices (`engine.configure_cpu_devices`; `--cpu_devices` changes it), or one of
   them for a wide model (width 512 at depth 4);
3. a breakdown: the loss alone (forward), value-and-grad (forward + backward), the optimiser +
   EMA tail alone, the full step with the batch already on the device and with the batch sent
   from the host every step (as `engine.train_loop` does), and every matmul of the step (the
   `dot_general`s of its jaxpr) timed alone. On a mesh of several devices each matmul has its
   per-device shape (the step traced at its share of the batch) and runs on every device at
   once, as in the data-parallel step. Their sum, less one trivial call's dispatch per matmul,
   gives a ceiling: the fraction of peak the step would reach if nothing but its matmuls took
   time;
4. the FLOPs of each compiled function from XLA's cost analysis next to the analytic count
   (`dit.flops_per_example`, x3 for a train step);
5. with `--torch_peer`, the same step in PyTorch (bench/torch_dit.py: the DiT ported, started
   from the same initial params, the same loss, clip, AdamW schedule and EMA), once eager and
   once under `torch.compile`, on the same batch as the JAX full step (already in memory)
   with torch using every core; both get the same analytic FLOP count per step. torch's
   OpenMP threads wait for each other after every op: with libgomp's default wait policy the
   tiny step ran ~100x slower (1.1 s, not 9 ms) while another process kept this 2-core
   machine busy, and about 12 ms with OMP_WAIT_POLICY=PASSIVE; the policy in force is printed.
   On a GPU (`--torch_device`, default: where JAX runs) the peer runs there too, each call
   waited for, with TF32 matmuls exactly when `--matmul_precision` gives them to JAX
   (bench/accelerator.sh runs that comparison).

The machine may be shared, and other jobs only ever add time. So every measurement is one call
at a time, waited for, and the measurements take turns (round-robin, `--rounds` rounds) so that
each one sees the same quiet and busy spells; the fastest call of each is reported (the median
is shown too). The last line is `fraction_of_peak=<x>`: the full step's analytic FLOP/s
(3 * forward FLOPs * batch / fastest step, device batch) over the float32 matmul peak, whatever
the model's dtype; a bfloat16 step's fraction of the bfloat16 peak is printed above it. With
`--torch_peer` the lines above it are `torch_eager_ratio=<x>` and `torch_compile_ratio=<x>`:
the JAX full step's examples/s over the PyTorch step's (above 1: JAX is faster), and with the
breakdown `torch_eager_ratio_ceiling=<x>` and `torch_compile_ratio_ceiling=<x>`: the same ratios
for a JAX step that were nothing but its matmuls (the ceiling of 3.), which no change to the
step's other work can pass.
"""

import argparse
import collections
import functools
import math
import os
import sys
import time
from typing import Any, Callable

import jax
from jax import lax
from jax.extend import core
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from modit_jax import dit
from modit_jax import engine
from modit_jax import errors
from modit_jax import models
# pylint: enable=g-import-not-at-top,wrong-import-position

_D = 64            # item-embedding dimension of the default synthetic world
_NUM_DOMAINS = 4
_DOTS_SHOWN = 12
_DOTS_ROW = "step's matmuls alone"
# The PyTorch peer's rows: name -> (under torch.compile, the key of its ratio line).
_TORCH_STEPS = {"torch eager step": (False, "torch_eager_ratio"),
                "torch.compile step": (True, "torch_compile_ratio")}


def _parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/pretrain.py",
                      help="config file whose get_config() gives the optimiser, EMA and "
                      "diffusion settings; the flags below override its model and batch")
  parser.add_argument("--width", type=int, default=None, help="default: the config's")
  parser.add_argument("--depth", type=int, default=None, help="default: the config's")
  parser.add_argument("--heads", type=int, default=None, help="default: the config's")
  parser.add_argument("--batch", type=int, default=None, help="default: the config's")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                      help="the model's compute dtype (default: the config's model.dtype); "
                      "with bfloat16 the bfloat16 matmul peak is measured too")
  parser.add_argument("--context", type=int, default=None,
                      help="context length L (default: the config's max_context)")
  parser.add_argument("--steps", type=int, default=30,
                      help="timed train steps (device batch); also the default --rounds")
  parser.add_argument("--rounds", type=int, default=None,
                      help="timed calls of every other measurement (default: --steps)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--matmul_sizes", default="1024,2048,4096",
                      help="comma-separated square sizes for the matmul peak")
  parser.add_argument("--no_breakdown", action="store_true",
                      help="time only the matmul peak and the full step")
  parser.add_argument("--variants", default="",
                      help="';'-separated extra full steps timed in the same round-robin, each "
                      "a space-separated list of key=value: batch=N, dtype=bfloat16 (the "
                      "model's compute dtype), devices=N (a mesh of the first N devices), "
                      "fsdp=true (parameters and optimiser state sharded over the mesh) "
                      "and/or XLA compiler options, e.g. "
                      "'batch=512;dtype=bfloat16;devices=1;xla_cpu_multi_thread_eigen=false'")
  parser.add_argument("--xla_flags", default="",
                      help="appended to XLA_FLAGS before the backend starts (e.g. "
                      "--xla_cpu_multi_thread_eigen=false)")
  parser.add_argument("--cpu_devices", type=int, default=None,
                      help="JAX devices on CPU, as the binaries' --cpu_devices (default: theirs, "
                      f"{engine.DEFAULT_CPU_DEVICES}); the step is data-parallel over them")
  parser.add_argument("--matmul_precision", default="",
                      help="jax_default_matmul_precision (e.g. highest); empty: JAX's default")
  parser.add_argument("--profile_dir", default="",
                      help="also write a jax.profiler trace of 3 full steps here")
  parser.add_argument("--torch_peer", action="store_true",
                      help="also time the step in PyTorch (bench/torch_dit.py), eager and under "
                      "torch.compile, in the same round-robin (needs pip install -e '.[bench]')")
  parser.add_argument("--torch_device", default="auto",
                      help="where the PyTorch peer runs: cpu, cuda, or auto (cuda when JAX's "
                      "devices are GPUs, else cpu). On a GPU, torch's float32 matmuls use TF32 "
                      "exactly when --matmul_precision asks JAX to (tensorfloat32 or high)")
  return parser.parse_args(argv)


def _load_config(spec_text: str, args: argparse.Namespace) -> Any:
  """The config of `path[:arg]` (as `--config` of the binaries), with the bench's overrides."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec_text.partition(":")
  if not os.path.isfile(path):
    raise SystemExit(f"--config: no such config file: {path}")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for flag, field in (("width", "width"), ("depth", "depth"), ("heads", "num_heads"),
                      ("context", "max_context")):
    if getattr(args, flag) is not None:
      setattr(config.model, field, getattr(args, flag))
  if args.batch is not None:
    config.batch_size = args.batch
  if args.dtype is not None:
    config.model.dtype = args.dtype
  return config


def _parse_variant(spec: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """({batch, devices, dtype, fsdp} as set, XLA options) of a `--variants` entry."""
  settings, options = {}, {}
  for item in spec.split():
    key, _, value = item.partition("=")
    if key == "batch":
      settings["batch"] = int(value)
    elif key == "fsdp":
      if value.lower() not in ("true", "false"):
        raise SystemExit(f"--variants: fsdp must be true or false; got {value!r}")
      settings["fsdp"] = value.lower() == "true"
    elif key == "devices":
      settings["devices"] = int(value)
      if not 1 <= settings["devices"] <= jax.device_count():
        raise SystemExit(f"--variants: devices={value}, but this process has "
                         f"{jax.device_count()} (see --cpu_devices)")
    elif key == "dtype":
      try:
        models.compute_dtype(value, "--variants: dtype")
      except errors.UserError as e:
        raise SystemExit(str(e)) from None
      settings["dtype"] = value
    elif value.lower() in ("true", "false"):
      options[key] = value.lower() == "true"
    else:
      options[key] = int(value) if value.lstrip("-").isdigit() else value
  return settings, options


def _parse_variants(text: str, batch_size: int, mesh_size: int
                    ) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
  """[(spec, settings, XLA options)] of `--variants`; exits with the reason, before anything
  slow, when an entry cannot run.

  Its batch must split evenly over its mesh (as every train batch must), and its XLA options
  must be ones this jaxlib knows: a trivial function is compiled with them.
  """
  variants = []
  for spec in filter(None, (x.strip() for x in text.split(";"))):
    settings, options = _parse_variant(spec)
    devices = settings.get("devices", mesh_size)
    v_batch = settings.get("batch", batch_size)
    if v_batch % devices:
      raise SystemExit(f"--variants {spec!r}: batch {v_batch} does not split evenly over "
                       f"{devices} devices")
    if options:
      try:
        jax.jit(lambda: jnp.zeros(())).lower().compile(compiler_options=options)
      except jax.errors.JaxRuntimeError as e:
        raise SystemExit(f"--variants {spec!r}: XLA refuses its options: "
                         f"{str(e).splitlines()[0]}") from None
    variants.append((spec, settings, options))
  return variants


def _build_step(config: Any, mesh: Any) -> tuple[Any, ...]:
  """(model, loss_fn, tx, params, host_state, shardings, jitted step) as modit_jax.cli.train has."""
  model = models.make_model(config.model, _D, _NUM_DOMAINS)
  loss_fn = models.denoising_loss_fn(model, config)
  tx = engine.make_optimizer(config)
  params = jax.device_get(dit.init_params(model, jax.random.PRNGKey(config.seed)))
  host_state = jax.device_get(jax.jit(functools.partial(engine.create_train_state, tx=tx))(params))
  shardings = engine.param_sharding(host_state, mesh, fsdp=bool(config.fsdp))
  step_fn = engine.jit_train_step(loss_fn, tx, config.ema_decay, mesh, shardings)
  return model, loss_fn, tx, params, host_state, shardings, step_fn


def _random_batch(batch: int, context: int, seed: int) -> dict[str, np.ndarray]:
  """A stage-1 shaped batch: unit context and target embeddings, all context slots real."""
  rng = np.random.default_rng(seed)

  def unit(*shape):
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  return {"context": unit(batch, context, _D),
          "context_mask": np.ones((batch, context), bool),
          "domain": rng.integers(0, _NUM_DOMAINS, batch).astype(np.int32),
          "target": unit(batch, _D)}


def _cost_flops(compiled: Any, num_devices: int = 1) -> float:
  """'flops' of a compiled function's XLA cost analysis (NaN when XLA gives none).

  XLA analyses the per-device program of a sharded function, which every device of the mesh
  runs: `num_devices` gives the work of all of them together.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  return num_devices * float((cost or {}).get("flops", float("nan")))


def _once(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def round_robin(fns: dict[str, Callable[[], Any]], calls: dict[str, int],
                rounds: int) -> dict[str, tuple[float, float]]:
  """{name: (fastest, median) seconds per call}, the functions taking turns.

  Each round makes `calls[name]` waited-for calls of every function (after one untimed call
  each, which compiles and warms up); the per-call time of a round is their mean. The order
  rotates from round to round, so that no function always runs after the same one.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  names = list(fns)
  times = collections.defaultdict(list)
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      n = calls.get(name, 1)
      times[name].append(sum(_once(fns[name]) for _ in range(n)) / n)
  return {name: (min(t), float(np.median(t))) for name, t in times.items()}


def step_dots(fn: Callable[..., Any], *args: Any) -> list[Any]:
  """The `dot_general` equations of `fn(*args)`'s jaxpr, sub-jaxprs included."""

  def walk(jaxpr, out):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        out.append(eqn)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if isinstance(sub, core.ClosedJaxpr):
            walk(sub.jaxpr, out)
          elif isinstance(sub, core.Jaxpr):
            walk(sub, out)
    return out

  return walk(jax.make_jaxpr(fn)(*args).jaxpr, [])


def timed_dot(shapes: tuple, dtypes: tuple, dims: Any, out_dtype: Any, mesh: Any = None
              ) -> tuple[float, Callable[[], Any]]:
  """(FLOPs, fn): a jitted `dot_general` of random operands, ready to time.

  With a `mesh` of several devices, every device runs its own copy at once, as the
  data-parallel step does with its per-device shapes; the FLOPs are then summed over devices.
  """
  copies = 1 if mesh is None else mesh.size
  lhs = jax.random.normal(jax.random.PRNGKey(0), (copies, *shapes[0]), dtypes[0])
  rhs = jax.random.normal(jax.random.PRNGKey(1), (copies, *shapes[1]), dtypes[1])
  local_dot = functools.partial(lax.dot_general, dimension_numbers=dims,
                                preferred_element_type=out_dtype)

  def dot(lhs, rhs):
    return local_dot(lhs[0], rhs[0])[None]

  if copies > 1:
    spec = P(engine.DATA_AXIS)
    lhs, rhs = (engine.device_put_global(x, NamedSharding(mesh, spec)) for x in (lhs, rhs))
    dot = jax.shard_map(dot, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
  dot = jax.jit(dot)
  out_size = jax.eval_shape(dot, lhs, rhs).size
  flops = 2.0 * out_size * math.prod(shapes[0][d] for d in dims[0][0])
  return flops, functools.partial(dot, lhs, rhs)


def dot_group_fns(eqns: list[Any], mesh: Any = None
                  ) -> list[tuple[int, tuple, Any, float, Callable[[], Any]]]:
  """One `timed_dot` per distinct matmul of `eqns`: (count, shapes, dims, FLOPs, fn)."""
  groups = collections.Counter(
      (tuple(tuple(v.aval.shape) for v in eqn.invars), tuple(v.aval.dtype for v in eqn.invars),
       eqn.params["dimension_numbers"], eqn.params.get("preferred_element_type"))
      for eqn in eqns)
  return [(count, shapes, dims, *timed_dot(shapes, dtypes, dims, out_dtype, mesh))
          for (shapes, dtypes, dims, out_dtype), count in groups.items()]


def profile_summary(trace_dir: str, hlo_text: str, num_steps: int, top: int = 15) -> None:
  """Prints the XLA ops of a `jax.profiler` trace of the step, grouped, busiest first.

  Times are summed over the executor's threads (CPU time, not wall time). Matmuls that XLA
  hands to Eigen run asynchronously: their events cover only the launch, so they look cheap
  here; YNNPACK matmuls (`ynn_fusion`) and XLA's own loop fusions are timed in full.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    print(f"no trace found under {trace_dir}")
    return
  # Which computations hold a dot, what each op calls, and the JAX op each one came from.
  dot_comps, calls, source, is_dot = set(), {}, {}, set()
  computation = None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      computation = line.split()[0].lstrip("%")
      continue
    match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
    if not match:
      continue
    op = match.group(1)
    if " dot(" in line:
      dot_comps.add(computation)
      is_dot.add(op)
    called = re.search(r"calls=%([\w.\-]+)", line)
    if called:
      calls[op] = called.group(1)
    op_name = re.search(r'op_name="([^"]*)"', line)
    if op_name:
      source[op] = op_name.group(1)
  per_op = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(paths[-1]).planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(s for s in event.stats if s[0])
        if stats.get("hlo_module") == "jit_train_step" and "hlo_op" in stats:
          per_op[stats["hlo_op"]] += event.duration_ns / 1e6 / num_steps

  def kind(op):
    if op in is_dot:
      return "matmul, Eigen (launch only)"
    if calls.get(op) in dot_comps:
      return "matmul, YNNPACK"
    return re.sub(r"\.\d+$", "", op)

  def where(op):
    # Drop the jit prefix and block numbers, so the same layer of every block adds up.
    text = re.sub(r"^jit\([^)]*\)/", "", source.get(op, "?"))
    return re.sub(r"block\d+", "block*", text)

  total = sum(per_op.values())
  by_kind, by_source = collections.Counter(), collections.Counter()
  for op, ms in per_op.items():
    by_kind[kind(op)] += ms
    if not kind(op).startswith("matmul"):
      by_source[where(op)] += ms
  print(f"profile: {total:.1f} ms of XLA-op thread time per step; by kind:")
  for name, ms in by_kind.most_common(top):
    print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {name}")
  print("non-matmul ops by source (all blocks together):")
  for name, ms in by_source.most_common(top):
    print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {name}")


def _import_torch_peer() -> Any:
  """bench/torch_dit.py, with torch on every core; a missing torch ends the run with a hint."""
  # The bench's own directory, as when it is run as a script (the tests load it by path).
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_dit  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name != "torch":
      raise
    raise SystemExit("--torch_peer needs PyTorch, a bench-only extra: "
                     "pip install -e '.[bench]'") from None
  torch.set_num_threads(os.cpu_count())
  return torch_dit


def _torch_device(requested: str, matmul_precision: str) -> str:
  """The peer's torch device for --torch_device, with TF32 set as JAX's matmul precision.

  On a GPU the two frameworks' float32 matmuls differ by default (torch keeps full float32;
  XLA may use TF32), so the peer follows --matmul_precision: TF32 exactly when JAX is asked
  for it. A comparison at JAX's default precision would time two different sums.
  """
  import torch  # pylint: disable=g-import-not-at-top
  device = requested
  if requested == "auto":
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  if device not in ("cpu", "cuda"):
    raise SystemExit(f"--torch_device: cpu, cuda or auto, got {requested!r}")
  if device == "cuda":
    if not torch.cuda.is_available():
      raise SystemExit("--torch_device=cuda, but this torch sees no GPU")
    if matmul_precision not in ("highest", "float32", "tensorfloat32", "high"):
      raise SystemExit("--torch_peer on a GPU needs --matmul_precision=highest (float32 in both "
                       "frameworks) or =tensorfloat32 (TF32 in both)")
    tf32 = matmul_precision in ("tensorfloat32", "high")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
  return device


def _torch_peer_steps(torch_dit: Any, config: Any, model: dit.DiT, params: Any,
                      batch_np: dict[str, np.ndarray], warmup: int,
                      device: str) -> dict[str, Callable[[], Any]]:
  """{name: one PyTorch train step}: eager and `torch.compile`d, each on its own model.

  Both start from the JAX model's initial params and step on `batch_np`, converted once (as
  the JAX full step's batch is already on the device), and take `warmup` untimed steps after
  the first, as the JAX step does. On a GPU each call waits for its kernels, as the JAX
  calls are waited for.
  """
  import torch  # pylint: disable=g-import-not-at-top
  print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')!r}"
        + (f", TF32 matmuls {torch.backends.cuda.matmul.allow_tf32}" if device == "cuda" else ""))
  batch = torch_dit.to_torch(batch_np, device)
  steps = {}
  for name, (compiled, _) in _TORCH_STEPS.items():
    module = torch_dit.DiT.like(model).to(device)
    torch_dit.load_jax_params(module, params)
    train_step = torch_dit.TrainStep(module, config, compiled=compiled, seed=config.seed)

    def call(train_step=train_step):
      metrics = train_step(batch)
      if device == "cuda":
        torch.cuda.synchronize()
      return metrics

    # The first call compiles (under torch.compile); timed here because it is not small.
    start = time.perf_counter()
    call()
    print(f"{name}: first call {time.perf_counter() - start:.1f} s")
    for _ in range(warmup):
      call()
    steps[name] = call
  return steps


def main(argv: list[str]) -> None:
  args = _parse_args(argv)
  # Before anything slow: a missing torch should fail at once.
  torch_dit = _import_torch_peer() if args.torch_peer else None
  rounds = args.rounds or args.steps
  # XLA reads XLA_FLAGS once, when the backend starts (the first device use, not the import).
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  engine.configure_cpu_devices(args.cpu_devices)
  if args.matmul_precision:
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
  torch_device = _torch_device(args.torch_device, args.matmul_precision) if torch_dit else None

  config = _load_config(args.config, args)
  model_dtype = config.model.get("dtype", "float32")
  if torch_dit is not None and model_dtype != "float32":
    raise SystemExit(f"--torch_peer: the PyTorch peer is float32 only; the model's dtype is "
                     f"{model_dtype}")
  batch_size, context_len = int(config.batch_size), int(config.model.max_context)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs; "
        f"jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"matmul precision {jax.config.jax_default_matmul_precision or 'default'}")

  # The step exactly as modit_jax.cli.train / engine.train_loop build it, on the mesh training
  # picks (`engine.train_mesh`: one CPU device for a wide model).
  mesh = engine.train_mesh(dit.flops_per_example(
      models.make_model(config.model, _D, _NUM_DOMAINS), context_len), int(config.mesh_devices))
  print(f"train step mesh: {mesh.size} of {jax.device_count()} devices")
  variants = _parse_variants(args.variants, batch_size, mesh.size)
  model, loss_fn, tx, params, host_state, shardings, step_fn = _build_step(config, mesh)
  rng = engine.device_put_global(jax.random.PRNGKey(config.seed), engine.replicated(mesh))
  batch_np = _random_batch(batch_size, context_len, config.seed)
  batch = engine.shard_batch(batch_np, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  fwd_flops = dit.flops_per_example(model, context_len)
  step_flops = 3 * fwd_flops * batch_size
  print(f"model: width {model.width}, depth {model.depth}, heads {model.num_heads}, "
        f"context {context_len} ({context_len + 2} tokens), {num_params / 1e6:.2f}M params, "
        f"compute {model_dtype}; "
        f"batch {batch_size}; forward {fwd_flops / 1e6:.1f} MFLOP/example (analytic)")

  compiled_step = step_fn.lower(host_state, batch, rng).compile()
  state = engine.device_put_global(host_state, shardings)
  before = jax.tree.leaves(state)[1]
  for _ in range(max(args.warmup, 1)):
    state, metrics = compiled_step(state, batch, rng)
  print(f"state donated: {before.is_deleted()}")

  def step(host_batch: bool):
    nonlocal state, metrics
    # engine.train_loop turns the numpy batch into a global array every step.
    state, metrics = compiled_step(
        state, engine.shard_batch(batch_np, mesh) if host_batch else batch, rng)
    return state, metrics

  peak_dtypes = ["float32", model_dtype]
  # Extra steps, compiled here and timed in the same round-robin so that they see the same load.
  variant_batch = {}
  variant_fns = {}
  for spec, settings, options in variants:
    v_batch_size = settings.get("batch", batch_size)
    v_mesh = engine.make_mesh(settings["devices"]) if "devices" in settings else mesh
    v_batch = engine.shard_batch(_random_batch(v_batch_size, context_len, config.seed), v_mesh)
    v_rng = engine.device_put_global(jax.random.PRNGKey(config.seed), engine.replicated(v_mesh))
    v_host_state, v_shardings, v_step_fn = host_state, shardings, step_fn
    if settings.keys() - {"batch"}:
      v_config = config.copy_and_resolve_references()
      v_config.model.dtype = settings.get("dtype", model_dtype)
      v_config.fsdp = settings.get("fsdp", config.fsdp)
      _, _, _, _, v_host_state, v_shardings, v_step_fn = _build_step(v_config, v_mesh)
      peak_dtypes.append(v_config.model.dtype)
    v_step = v_step_fn.lower(v_host_state, v_batch, v_rng).compile(
        compiler_options=options or None)
    v_state = [engine.device_put_global(v_host_state, v_shardings)]

    def v_call(v_step=v_step, v_state=v_state, v_batch=v_batch, v_rng=v_rng):
      v_state[0], v_metrics = v_step(v_state[0], v_batch, v_rng)
      return v_metrics

    variant_batch[f"step [{spec}]"] = v_batch_size
    variant_fns[f"step [{spec}]"] = (v_call, 3 * fwd_flops * v_batch_size,
                                            _cost_flops(v_step, v_mesh.size))

  # name -> (function, analytic FLOPs, XLA FLOPs); timed round-robin below.
  # The float32 peak is the yardstick whatever the model's dtype; a bfloat16 model is
  # also held against the bfloat16 peak (float32 accumulation and output, as the model's
  # matmuls), which on bf16 hardware is several times higher.
  peak_dot = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
  measured = {}
  peak_names = collections.defaultdict(list)
  for dtype_name in dict.fromkeys(peak_dtypes):
    dtype = models.compute_dtype(dtype_name)
    for n in (int(s) for s in args.matmul_sizes.split(",")):
      a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
      b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
      name = f"matmul {n}x{n}" + ("" if dtype_name == "float32" else f" {dtype_name}")
      measured[name] = (functools.partial(peak_dot, a, b), 2.0 * n ** 3, float("nan"))
      peak_names[dtype_name].append(name)
  measured["full step (device batch)"] = (functools.partial(step, False), step_flops,
                                          _cost_flops(compiled_step, mesh.size))
  measured.update(variant_fns)
  if torch_dit is not None:
    for name, fn in _torch_peer_steps(torch_dit, config, model, params, batch_np,
                                      args.warmup, torch_device).items():
      measured[name] = (fn, step_flops, float("nan"))
  dots = []
  if not args.no_breakdown:
    step_rng = jax.random.fold_in(rng, 0)
    fwd = jax.jit(loss_fn).lower(params, batch, step_rng).compile()
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(
        params, batch, step_rng).compile()
    _, grads = grad(params, batch, step_rng)

    # The step's tail alone: clip + AdamW + EMA + grad norm, elementwise over the params.
    def tail(state, grads):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      new_params = optax.apply_updates(state.params, updates)
      ema = jax.tree.map(lambda e, p: config.ema_decay * e + (1.0 - config.ema_decay) * p,
                         state.ema_params, new_params)
      new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                                ema_params=ema)
      return new_state, optax.tree.norm(grads)

    tail_jit = jax.jit(tail, donate_argnums=(0,)).lower(host_state, grads).compile()
    tail_state = engine.device_put_global(host_state, shardings)

    def tail_call():
      nonlocal tail_state
      tail_state, norm = tail_jit(tail_state, grads)
      return norm

    measured["forward (loss)"] = (functools.partial(fwd, params, batch, step_rng),
                                  fwd_flops * batch_size, _cost_flops(fwd, mesh.size))
    measured["forward+backward (grad)"] = (functools.partial(grad, params, batch, step_rng),
                                           step_flops, _cost_flops(grad, mesh.size))
    measured["optimiser+EMA tail"] = (tail_call, 0.0, _cost_flops(tail_jit, mesh.size))
    measured["full step (host batch)"] = (functools.partial(step, True), step_flops,
                                          _cost_flops(compiled_step, mesh.size))
    # Every matmul of the step alone: what the step would cost if nothing else took time. With
    # a batch split over the mesh (parameters replicated), each device runs the step's program
    # at its share of the batch, so the matmuls are traced at that size and run on every
    # device at once; the gradient all-reduce is not a matmul and is left out.
    local_batch = {k: v[:batch_size // mesh.size] for k, v in batch_np.items()}
    eqns = step_dots(functools.partial(engine.train_step, loss_fn=loss_fn, tx=tx,
                                       ema_decay=config.ema_decay), host_state, local_batch, rng)
    dots = dot_group_fns(eqns, mesh)
    for i, (_, _, _, flops, fn) in enumerate(dots):
      measured[f"dot{i}"] = (fn, flops, float("nan"))
    # What each of those calls pays besides its matmul: the same call with an 8x8 matmul.
    dispatch_flops, dispatch_fn = timed_dot(((8, 8), (8, 8)), (jnp.float32,) * 2,
                                            (((1,), (0,)), ((), ())), None, mesh)
    measured["dot_dispatch"] = (dispatch_fn, dispatch_flops, float("nan"))

  # A few calls of each matmul per round, so they are not timed off a single short call.
  calls = {name: 3 for name in measured if name.startswith("dot")}
  times = round_robin({name: m[0] for name, m in measured.items()}, calls, rounds)
  if not np.isfinite(float(metrics["loss"])):
    raise RuntimeError(f"the step's loss is not finite: {metrics['loss']}")
  torch_rows = [name for name in _TORCH_STEPS if name in measured]
  for name in torch_rows:
    loss = float(measured[name][0]()["loss"])
    if not np.isfinite(loss):
      raise RuntimeError(f"the {name}'s loss is not finite: {loss}")

  if args.profile_dir:
    with jax.profiler.trace(args.profile_dir):
      for _ in range(3):
        jax.block_until_ready(step(False))
    print(f"profile of 3 steps written to {args.profile_dir}")
    profile_summary(args.profile_dir, compiled_step.as_text(), 3)

  peaks = {dtype_name: max(measured[name][1] / times[name][0] for name in names)
           for dtype_name, names in peak_names.items()}
  peak = peaks["float32"]
  step_s = times["full step (device batch)"][0]
  rows = [name for name in measured if not name.startswith("dot")]
  if dots:
    dots_s = sum(d[0] * times[f"dot{i}"][0] for i, d in enumerate(dots))
    dots_flops = sum(count * flops for count, _, _, flops, _ in dots)
    times[_DOTS_ROW] = (dots_s, float("nan"))
    measured[_DOTS_ROW] = (None, dots_flops, float("nan"))
    rows.append(_DOTS_ROW)

  print()
  print(f"fastest call of {rounds} (median); FLOP/s and share of peak from the fastest call")
  print(f"{'':34s} {'ms/call':>17s} {'examples/s':>10s} {'GFLOP':>7s} {'XLA GFLOP':>9s} "
        f"{'GFLOP/s':>7s} {'of f32 peak':>11s}")
  for name in rows:
    (best, median), (_, flops, xla) = times[name], measured[name]
    rate = flops / best
    ms = f"{best * 1e3:8.1f}" + (f" ({median * 1e3:6.1f})" if np.isfinite(median) else " " * 9)
    per_example = ("step" in name or "forward" in name) and "matmuls" not in name
    examples = f"{variant_batch.get(name, batch_size) / best:10.1f}" if per_example else " " * 10
    xla_text = f"{xla / 1e9:9.2f}" if np.isfinite(xla) else " " * 9
    print(f"{name:34s} {ms} {examples} {flops / 1e9:7.2f} {xla_text} {rate / 1e9:7.1f} "
          f"{rate / peak:11.3f}")
  if dots:
    print()
    where = ("at its global shape on one device" if mesh.size == 1 else
             f"at its per-device shape on all {mesh.size} devices at once")
    print(f"the step's {len(eqns)} matmuls, each alone {where}: "
          f"{dots_s * 1e3:.1f} ms = "
          f"{100 * dots_s / step_s:.0f}% of the step at {dots_flops / dots_s / 1e9:.1f} GFLOP/s; "
          f"everything else: {(step_s - dots_s) * 1e3:.1f} ms. Largest totals:")
    if dots_s > step_s:
      print("  (more than the whole step: each matmul timed alone also pays a dispatch, which on "
            "an accelerator outweighs a small matmul; this split means little here)")
    order = sorted(range(len(dots)), key=lambda i: -dots[i][0] * times[f"dot{i}"][0])
    for i in order[:_DOTS_SHOWN]:
      count, shapes, dims, flops, _ = dots[i]
      seconds = times[f"dot{i}"][0]
      (lc, rc), (lb, rb) = dims
      desc = f"{list(shapes[0])} x {list(shapes[1])}, contract {list(lc)},{list(rc)}"
      if lb:
        desc += f", batch {list(lb)},{list(rb)}"
      print(f"  {count:2d} x {seconds * 1e3:6.2f} ms {flops / seconds / 1e9:6.1f} GFLOP/s  {desc}")
    # The most the step could reach if all its non-matmul work (and each timed call's dispatch)
    # cost nothing: a ceiling for fraction_of_peak with these matmul shapes on this machine.
    dispatch_s = times["dot_dispatch"][0]
    ceiling_s = dots_s - len(eqns) * dispatch_s
    if ceiling_s < 0.1 * dots_s:
      ceiling_s = float("nan")
    print(f"one call of an 8x8 matmul the same way takes {dispatch_s * 1e6:.0f} us; ", end="")
    if not np.isfinite(ceiling_s):
      print("the matmuls' own time is lost in that dispatch, so there is no ceiling to give")
    else:
      print(f"less {len(eqns)} of those, the matmuls take {ceiling_s * 1e3:.1f} ms: with nothing "
            f"else, the step would reach {step_flops / ceiling_s / peak:.3f} of the peak")
  fraction = step_flops / step_s / peak
  print()
  print(f"train step: {batch_size / step_s:.1f} examples/s, {1 / step_s:.3f} steps/s, "
        f"{step_flops / step_s / 1e9:.1f} GFLOP/s (analytic 3x forward {step_flops / 1e9:.2f} "
        f"GFLOP/step; XLA cost analysis {measured['full step (device batch)'][2] / 1e9:.2f}); "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s")
  for dtype_name, dtype_peak in peaks.items():
    if dtype_name != "float32":
      print(f"{dtype_name} matmul peak {dtype_peak / 1e9:.1f} GFLOP/s "
            f"({dtype_peak / peak:.2f}x the float32 peak)")
  if model_dtype != "float32":
    print(f"the {model_dtype} step reaches {step_flops / step_s / peaks[model_dtype]:.3f} of the "
          f"{model_dtype} peak")
  for name in torch_rows:
    torch_s = times[name][0]
    print(f"{name}: {batch_size / torch_s:.1f} examples/s, "
          f"{step_flops / torch_s / 1e9:.1f} GFLOP/s = {step_flops / torch_s / peak:.3f} of the "
          f"float32 matmul peak (JAX: {fraction:.3f})")
  for name in torch_rows:
    # JAX's examples/s over torch's, the same batch and FLOPs: the torch time over JAX's.
    print(f"{_TORCH_STEPS[name][1]}={times[name][0] / step_s:.3f}")
  if dots and np.isfinite(ceiling_s):
    # The same ratio if the JAX step were nothing but its matmuls as XLA runs them: no layout
    # or fusion change can take the step past it, only faster matmuls can.
    for name in torch_rows:
      print(f"{_TORCH_STEPS[name][1]}_ceiling={times[name][0] / ceiling_s:.3f}")
  print(f"fraction_of_peak={fraction:.3f}")


if __name__ == "__main__":
  main(sys.argv[1:])
